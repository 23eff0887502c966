"""`pacflow train-offline`: retrain PAC from an episode archive in one process (no Ray).

The archive's collected episodes (optionally filtered, e.g. `--where "cycle <= 3"`) are loaded into
an in-process Reverb table through the same adder the actors use, the same PACLearner trains on
it, and the result is checkpointed, evaluated greedily and saved as a snapshot that records which
data it was trained on (archive manifest hash, episode count, filter).
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
import time
from pathlib import Path

import numpy as np

from actors.loop import EnvironmentLoop, EpisodeContext
from cluster.config import EnvConfig, ExperimentConfig, config_to_dict
from learners.checkpoints import save_checkpoint
from learners.learner import PACLearner
from policies.policy import PACPolicy
from policies.snapshot import Snapshot, save_snapshot, snapshot_metadata
from replay.adders import ReverbSequenceAdder
from replay.archive import EpisodeArchive
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from replay.spec import EnvSpec, Episode

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
        "<": operator.lt, ">": operator.gt}
_CLAUSE = re.compile(r"^\s*(\w+)\s*(<=|>=|==|!=|<|>)\s*('[^']*'|-?\d+(?:\.\d+)?)\s*$")


class FilterError(ValueError):
    """A --where expression that cannot be parsed or names an unknown column."""


def parse_where(where: str | None, columns: set[str]):
    """'cycle <= 3 and mode == \\'collect\\'' -> a predicate over a row dict."""
    clauses = []
    for part in re.split(r"\s+and\s+", where or "") if where else []:
        m = _CLAUSE.match(part)
        if not m:
            raise FilterError(f"--where: cannot parse {part!r} (use e.g. \"cycle <= 3\")")
        name, op, raw = m.groups()
        if name not in columns:
            raise FilterError(f"--where: unknown column {name!r}; "
                              f"columns: {', '.join(sorted(columns))}")
        value = raw[1:-1] if raw.startswith("'") else (float(raw) if "." in raw else int(raw))
        clauses.append((name, _OPS[op], value))
    return lambda row: all(op(row[name], value) for name, op, value in clauses)


def select_episodes(archive: EpisodeArchive, where: str | None) -> tuple[list[Episode], str]:
    """Collected episodes passing the filter, and the sha256 of their sorted episode ids."""
    table = archive.episode_table()
    keep = parse_where(where, set(table.column_names))
    rows = [r for r in table.to_pylist() if r["mode"] == "collect" and keep(r)]
    ids = sorted(r["episode_id"] for r in rows)
    manifest_hash = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    episodes = [archive.read(archive.path_of(i)) for i in ids]
    return episodes, manifest_hash


def evaluate(policy: PACPolicy, spec: EnvSpec, task: str, env: EnvConfig,
             num_episodes: int, seed: int) -> list[float]:
    envs = [env.make(task, seed + i) for i in range(min(num_episodes, 4))]
    ctx = EpisodeContext("offline", 0, "eval", task, spec.task_names.index(task), "eval")
    seeds = [10_000 + seed * 1000 + i for i in range(num_episodes)]
    return [e.episode_return for e in EnvironmentLoop(envs, spec).run(policy, seeds, ctx, True)]


def train_offline(config: ExperimentConfig, archive_uri: str, run_dir: Path, steps: int,
                  where: str | None = None, seed: int = 0) -> dict:
    """Loads, trains, evaluates, snapshots; returns the summary also written to result.json."""
    t0 = time.time()
    for sub in ("checkpoints", "policies", "replay_checkpoints", "report"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    episodes, manifest_hash = select_episodes(EpisodeArchive(archive_uri), where)
    if not episodes:
        raise FilterError(f"no collected episodes in {archive_uri} match {where!r}")
    spec = config.env.spec()
    server = ReplayServer(spec, config.replay, run_dir / "replay_checkpoints")
    try:
        adder = ReverbSequenceAdder(server.address, config.replay)
        for episode in episodes:
            adder.add_episode(episode)
        batches = ReverbBatchIterator(server.address, config.replay, config.learner.batch_size)
        learner = PACLearner(spec, config.model, config.learner, batches, seed=seed)
        metrics = learner.run(steps)
        batches.close()
    finally:
        server.stop()
    save_checkpoint(learner.state(), run_dir / "checkpoints", step=learner.num_steps, cycle=0)
    returns = np.asarray([e.episode_return for e in episodes])
    data = {"archive": str(archive_uri), "manifest_sha256": manifest_hash,
            "episodes": len(episodes), "filter": where or ""}
    snapshot = Snapshot.from_state_dict(1, learner.get_variables(), snapshot_metadata(
        spec.to_dict(), config.model, 0, learner.num_steps, 0, trained_on=data))
    save_snapshot(snapshot, run_dir / "policies")
    policy = PACPolicy.from_snapshot(snapshot, seed)
    eval_by_task = {task: evaluate(policy, spec, task, config.env,
                                   config.loop.eval_episodes, seed) for task in config.env.tasks}
    eval_returns = [r for returns in eval_by_task.values() for r in returns]
    result = {"data": {**data, "mean_return": float(returns.mean()),
                       "best_return": float(returns.max())},
              "learner": {k: float(v) for k, v in metrics.items()}, "steps": steps,
              "seed": seed, "alpha": config.learner.alpha, "beta": config.learner.beta,
              "eval_returns": eval_returns, "eval_mean": float(np.mean(eval_returns)),
              "eval_by_task": {t: float(np.mean(r)) for t, r in eval_by_task.items()},
              "seconds": time.time() - t0, "config": config_to_dict(config)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result

