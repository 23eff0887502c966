"""`pacflow bench learning`: the demo-style collect-and-infer loop under a wall-clock budget, over
seeds, next to a uniform-random baseline measured in the same runs.

    pacflow bench learning --task dm_control:cartpole-swingup --budget-minutes 10 --seeds 3

Each seed is one `pacflow run` (its own local Ray instance) of the task's config with
`loop.budget_seconds` set: cycles run until the next one would end past the budget, and the last
is evaluated greedily. The baseline is cycle 0's return: those episodes act uniformly at random.
The JSON holds the per-seed final return (ratio = ours / random), the IQM over seeds with a 95%
bootstrap interval (scipy), and every seed's curve: return vs env steps and vs wall-clock.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from cluster.bench import machine
from cluster.config import ExperimentConfig, config_to_dict, load_config
from cluster.report import read_state

# Tuned configs per task; any other task runs the cartpole demo config with its name swapped in.
TASK_CONFIGS = {"dm_control:cartpole-swingup": "deploy/configs/cartpole.yaml",
                "dm_control:walker-walk": "deploy/configs/walker.yaml",
                "dm_control:cheetah-run": "deploy/configs/cheetah.yaml"}


def learning_config(task: str, budget_minutes: float, seed: int,
                    config_path: str | None = None) -> ExperimentConfig:
    """The task's config with the budget and seed set and room for as many cycles as fit."""
    root = Path(__file__).resolve().parent.parent
    path = config_path or str(root / TASK_CONFIGS.get(task, TASK_CONFIGS[
        "dm_control:cartpole-swingup"]))
    overrides = [f"env.tasks=[{task}]", f"loop.seed={seed}", "loop.num_cycles=10000",
                 f"loop.budget_seconds={budget_minutes * 60}"]
    return load_config(path, overrides)


def iqm_with_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Interquartile mean (25% trimmed mean) and its 95% percentile-bootstrap interval."""
    x = np.asarray(values, np.float64)
    iqm = float(stats.trim_mean(x, 0.25))
    if len(x) < 2 or np.all(x == x[0]):
        return iqm, iqm, iqm
    ci = stats.bootstrap((x,), lambda v, axis: stats.trim_mean(v, 0.25, axis=axis),
                         confidence_level=0.95, n_resamples=2000, method="percentile",
                         random_state=np.random.default_rng(seed)).confidence_interval
    return iqm, float(ci.low), float(ci.high)


def curve_of(rows: list) -> dict:
    """A run's cycle rows -> its learning curve (cumulative wall-clock; None = not evaluated)."""
    seconds = np.cumsum([r.seconds for r in rows]).tolist()
    return {"cycle": [r.cycle for r in rows], "env_steps": [r.env_steps for r in rows],
            "seconds": seconds, "learner_steps": [r.learner_steps for r in rows],
            "collect_return": [r.collect_return for r in rows],
            "eval_return": [r.eval_return for r in rows]}


def run_learning_bench(task: str, budget_minutes: float, seeds: int, out_dir: Path,
                       json_path: str | None = None, config_path: str | None = None,
                       log: Callable[[str], None] = print) -> dict:
    from cluster.driver import run_experiment

    runs, results = [], []
    for seed in range(seeds):
        config = learning_config(task, budget_minutes, seed, config_path)
        run_dir = out_dir / f"{task.split(':')[-1]}-seed{seed}"
        t0 = time.time()
        rows = run_experiment(config, run_dir.absolute(), out=io.StringIO())
        wall = time.time() - t0
        final = next(r.eval_return for r in reversed(rows) if r.eval_return is not None)
        random_return = rows[0].collect_return  # cycle 0 acts uniformly at random
        state = read_state(str(run_dir.absolute()))
        runs.append({"seed": seed, "run_dir": str(run_dir), "wall_seconds": wall,
                     "final_eval_return": final, "random_return": random_return,
                     "mode": config.loop.mode.value, "env_steps": rows[-1].env_steps,
                     "learner_steps": rows[-1].learner_steps,
                     "busy_fraction": state.get("busy_fraction"),
                     "staleness": state.get("staleness"), "curve": curve_of(rows)})
        results.append({"case": f"task={task},seed={seed}", "metric": "final_eval_return",
                        "value": final, "unit": "return", "baseline": random_return,
                        "ratio": final / random_return if random_return > 0 else None})
        log(f"seed {seed}: final greedy return {final:.1f} (random {random_return:.1f}) after "
            f"{rows[-1].env_steps} env steps, {len(rows)} cycles, {wall:.0f}s")
    finals = [r["final_eval_return"] for r in runs]
    randoms = [r["random_return"] for r in runs]
    iqm, low, high = iqm_with_interval(finals)
    random_iqm = float(stats.trim_mean(randoms, 0.25))
    results.append({"case": f"task={task},seeds={seeds}", "metric": "final_eval_return_iqm",
                    "value": iqm, "unit": "return", "baseline": random_iqm,
                    "ratio": iqm / random_iqm if random_iqm > 0 else None,
                    "ci95": [low, high], "median": float(np.median(finals))})
    report = {"benchmark": "learning", "machine": machine(), "task": task,
              "budget_minutes": budget_minutes,
              "config": config_to_dict(config),  # the last seed's; seeds differ only in loop.seed
              "results": results, "runs": runs}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
