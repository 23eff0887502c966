"""`pacflow bench samplers`: sampled items per second that one Reverb server delivers to 1, 2
and 4 `ReverbBatchIterator`s at once, each in its own process (as a data-parallel learner's
workers, or several learners, sample one server), at a GPU learner's batch size.

The table is filled once (the demo's items: cartpole, n-step 5); then for each count N, N
processes each build an iterator, draw its read-ahead, wait for the others (a barrier) and time
`batches` batches. Rate = N x batches x batch size / the slowest process's seconds. The baseline
is the 1-sampler rate of the same run, so the ratio says how far more samplers raise what one
server delivers (N would be perfect scaling).
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.bench import BENCH_SPEC, machine
from cluster.bench_replay import item_bytes, make_episode, replay_process
from replay.config import ReplayConfig

N_STEP = 5  # deploy/configs/cartpole.yaml
EPISODE_LENGTH = 125  # transitions per demo episode (1000 steps at action repeat 8)


def _sampler(address: str, config: ReplayConfig, batch_size: int, batches: int, barrier,
             results) -> None:
    """One sampling process: puts the seconds its `batches` timed batches took."""
    from replay.dataset import ReverbBatchIterator, configure_tf_threads

    configure_tf_threads()  # as in the learner (replay/dataset.py)
    iterator = ReverbBatchIterator(address, config, batch_size)
    for _ in range(config.prefetch_batches + 2):  # the read-ahead is not what we time
        next(iterator)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - t0
    assert batch.reward.shape[0] == batch_size
    iterator.close(wait_seconds=config.timeout_seconds)
    results.put(seconds)


def sample_rate(address: str, config: ReplayConfig, samplers: int, batch_size: int,
                batches: int) -> float:
    """Items per second that `samplers` processes sample together."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(samplers), ctx.Queue()
    procs = [ctx.Process(target=_sampler, args=(address, config, batch_size, batches, barrier,
                                                 results)) for _ in range(samplers)]
    for p in procs:
        p.start()
    seconds = [results.get(timeout=config.timeout_seconds * 10) for _ in procs]
    for p in procs:
        p.join(config.timeout_seconds)
    return samplers * batches * batch_size / max(seconds)


def run_sampler_bench(counts: tuple[int, ...] = (1, 2, 4), batch_size: int = 1024,
                      batches: int = 20, episodes: int = 60, json_path: str | None = None,
                      seed: int = 0) -> dict:
    """Fills a table with `episodes` demo episodes, then measures every sampler count."""
    from replay.adders import ReverbSequenceAdder

    config = ReplayConfig(n_step=N_STEP, timeout_seconds=60.0)
    rng = np.random.default_rng(seed)
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            replay_process(BENCH_SPEC, config, str(Path(tmp) / "ckpt")) as address:
        adder = ReverbSequenceAdder(address, config)
        for _ in range(episodes):
            adder.add_episode(make_episode(BENCH_SPEC, rng, EPISODE_LENGTH))
        adder.close()
        for n in sorted(set(counts) | {1}):
            rates[n] = sample_rate(address, config, n, batch_size, batches)
    size = item_bytes(BENCH_SPEC, N_STEP)
    results = [{"case": f"samplers={n},batch={batch_size},item={size}B", "metric":
                "sample_items_per_s", "value": rates[n], "unit": "1/s", "baseline": rates[1],
                "ratio": rates[n] / rates[1]} for n in sorted(rates)]
    report = {"benchmark": "samplers", "machine": machine(), "batches_per_sampler": batches,
              "table_items": episodes * EPISODE_LENGTH,
              "baseline": "one sampler process, same server, table and batch size",
              "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
