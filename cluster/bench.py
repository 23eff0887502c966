"""`pacflow bench learner`: PAC learner throughput through the real Reverb data path.

Baseline, measured in the same run: the same learner fed from batches already in memory (the
network's own speed). Ratio = ours / baseline, so 1.0 means the data path costs nothing.
On CUDA the model FLOP utilisation is reported too (FLOPs counted by torch's FlopCounterMode).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from learners.config import LearnerConfig
from learners.learner import PACLearner, resolve_device
from policies.perceiver import PRESETS, PerceiverConfig, count_parameters
from replay.adders import ReverbSequenceAdder
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from replay.spec import EnvSpec, Episode, Lineage

# Dense bf16 peak FLOP/s of the GPUs we run on, by a substring of the device name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
BENCH_SPEC = EnvSpec.single("dm_control:cartpole-swingup", ("position", "velocity"), (3, 2), 1)


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def _episode(rng: np.random.Generator, length: int) -> Episode:
    T, spec = length, BENCH_SPEC
    lineage = Lineage("bench", 0, 1, "bench", spec.task_names[0], os.urandom(16).hex(), 0,
                      "collect", 0.0, 0.0)
    action = rng.uniform(-1, 1, (T + 1, spec.action_dim)).astype(np.float32)
    action[-1] = 0
    reward, discount = rng.uniform(0, 1, T + 1).astype(np.float32), np.ones(T + 1, np.float32)
    reward[-1] = discount[-1] = 0
    return Episode(lineage, 0, rng.normal(size=(T + 1, spec.obs_dim)).astype(np.float32),
                   action, reward, discount, np.ones(T + 1, np.int64), False, True)


def _time_steps(learner: PACLearner, steps: int) -> tuple[float, float]:
    """(seconds per update, fraction of step time waiting for data) after a warm-up."""
    learner.run(3)
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    t0, wait = time.perf_counter(), 0.0
    for _ in range(steps):
        wait += learner.step()["data_wait_s"]
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return elapsed / steps, wait / elapsed


def _flops_per_step(learner: PACLearner) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        learner.step()
    return float(counter.get_total_flops())


def bench_learner(preset: str, steps: int, batch_size: int, device: str,
                  threads: int = LearnerConfig.num_threads) -> dict:
    model_config = PerceiverConfig(**PRESETS[preset], v_max=400.0)
    config = LearnerConfig(batch_size=batch_size, device=device, num_threads=threads)
    replay_config = ReplayConfig(n_step=3, prefetch_batches=4)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        server = ReplayServer(BENCH_SPEC, replay_config, Path(tmp) / "ckpt")
        adder = ReverbSequenceAdder(server.address, replay_config)
        for _ in range(8):
            adder.add_episode(_episode(rng, 250))
        batches = ReverbBatchIterator(server.address, replay_config, batch_size,
                                      pin_memory=resolve_device(device).type == "cuda")
        in_memory = [next(batches) for _ in range(8)]
        baseline = PACLearner(BENCH_SPEC, model_config, config, itertools.cycle(in_memory))
        base_s, _ = _time_steps(baseline, steps)
        del baseline
        ours = PACLearner(BENCH_SPEC, model_config, config, batches)
        ours_s, wait_fraction = _time_steps(ours, steps)
        result_extra = {"parameters": count_parameters(ours.model)}
        if ours.device.type == "cuda":
            name = torch.cuda.get_device_name(0)
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            flops = _flops_per_step(ours)
            result_extra["mfu"] = flops / ours_s / peak if peak else None
        batches.close()
        server.stop()
    case = f"preset={preset},batch={batch_size},device={ours.device.type}"
    if ours.device.type == "cpu":
        case += f",threads={threads}"
    return {"case": case, "ours_s": ours_s, "base_s": base_s, "wait": wait_fraction,
            "batch_size": batch_size, **result_extra}


def learner_results(r: dict) -> list[dict]:
    """The DESIGN §6 result rows for one bench_learner case."""
    rows = [
        {"case": r["case"], "metric": "updates_per_s", "value": 1 / r["ours_s"], "unit": "1/s",
         "baseline": 1 / r["base_s"], "ratio": r["base_s"] / r["ours_s"]},
        {"case": r["case"], "metric": "samples_per_s", "value": r["batch_size"] / r["ours_s"],
         "unit": "1/s", "baseline": r["batch_size"] / r["base_s"],
         "ratio": r["base_s"] / r["ours_s"]},
        {"case": r["case"], "metric": "data_wait_fraction", "value": r["wait"], "unit": "1",
         "baseline": 0.0, "ratio": None},
        {"case": r["case"], "metric": "parameters", "value": r["parameters"], "unit": "1",
         "baseline": None, "ratio": None},
    ]
    if r.get("mfu") is not None:
        rows.append({"case": r["case"], "metric": "mfu", "value": r["mfu"], "unit": "1",
                     "baseline": None, "ratio": None})
    return rows


def run_learner_bench(presets: list[str], steps: int, batch_size: int, device: str,
                      json_path: str | None, threads: list[int] | None = None) -> dict:
    """One case per preset and CPU thread count (`threads`, default the config's)."""
    results = []
    for preset in presets:
        for n in threads or [LearnerConfig.num_threads]:
            results += learner_results(bench_learner(preset, steps, batch_size, device, n))
    report = {"benchmark": "learner", "machine": machine(), "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['benchmark']} on {report['machine']}",
             f"{'case':40} {'metric':20} {'value':>12} {'baseline':>12} {'ratio':>6}"]
    for r in report["results"]:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"{r['case']:40} {r['metric']:20} {fmt(r['value']):>12} "
                     f"{fmt(r['baseline']):>12} {fmt(r['ratio']):>6}")
    return "\n".join(lines)
