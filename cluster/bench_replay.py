"""`pacflow bench replay`: insert and sample throughput of our replay path against raw Reverb.

For each item shape, in one run against one Reverb server and table:
- inserts: `replay.adders.ReverbSequenceAdder.add_episode` (Episode in, (n+1)-record items out)
  against a bare `TrajectoryWriter` appending the same, already split records and creating the
  same items with the same flush cadence (`replay.bench_raw.raw_insert_seconds`);
- samples: `replay.dataset.ReverbBatchIterator` (torch Batches out of its prefetch thread)
  against a bare `reverb.TrajectoryDataset` (tf.data, eager tensors), same table, same batch
  size (`replay.bench_raw.raw_sample_seconds`).
The server runs in its own process, as in a run, so both sides go through gRPC (in one process
Reverb would read the table directly). Ours and raw alternate over `rounds` rounds (ours, raw,
raw, ours, ...), so a busy neighbour on a shared box slows both alike. Ratio = ours / raw items
per second: 1.0 means our layer costs nothing over Reverb's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import queue
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from cluster.bench import BENCH_SPEC, _episode, machine
from replay.adders import ReverbSequenceAdder, episode_records
from replay.bench_raw import raw_insert_seconds, raw_sample_seconds, table_size
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from replay.spec import EnvSpec, Episode


@dataclasses.dataclass(frozen=True)
class ReplayCase:
    """One item shape and how much work to time for it."""

    name: str  # the `case` field of the result rows
    spec: EnvSpec  # observation/action sizes and camera shape of the items
    n_step: int  # items hold n_step + 1 records
    episode_length: int  # transitions per episode (= items per episode)
    insert_episodes: int  # timed episodes per side (ours, raw), split over the rounds
    sample_batches: int  # timed batches per side, split over the rounds
    batch_size: int  # items per sampled batch


# The demo (deploy/configs/cartpole.yaml): cartpole-swingup, obs 5, action 1, n_step 5, 1000-step
# episodes at action_repeat 8 = 125 transitions, learner batch 128. The pixel case adds the
# 64x64x3 uint8 camera of deploy/configs/cartpole_pixels.yaml to the same proprioception.
PIXEL_SPEC = dataclasses.replace(BENCH_SPEC, pixels_shape=(64, 64, 3))
DEFAULT_CASES = (
    ReplayCase("cartpole obs=5 act=1 n_step=5", BENCH_SPEC, 5, 125, 60, 120, 128),
    ReplayCase("pixels 64x64x3 uint8 + obs=5 n_step=5", PIXEL_SPEC, 5, 125, 40, 48, 128),
)


def make_episode(spec: EnvSpec, rng: np.random.Generator, length: int) -> Episode:
    """A random truncated episode; camera frames are uniform noise (the worst case for Reverb's
    chunk compression) when the spec has a camera."""
    episode = _episode(rng, length)
    if not spec.pixels_shape:
        return episode
    pixels = rng.integers(0, 256, (length + 1, *spec.pixels_shape), dtype=np.uint8)
    return dataclasses.replace(episode, pixels=pixels)


def item_bytes(spec: EnvSpec, n_step: int) -> int:
    """Bytes of one item's tensors (what a sampled item carries)."""
    per_record = 4 * (spec.obs_dim + spec.action_dim + 3) + 8 * 3 + int(np.prod(spec.pixels_shape))
    return (n_step + 1) * per_record


def _serve(spec: EnvSpec, config: ReplayConfig, checkpoint_dir: str, addresses, stop) -> None:
    server = ReplayServer(spec, config, checkpoint_dir)
    addresses.put(server.address)
    stop.wait()
    server.stop()


@contextlib.contextmanager
def replay_process(spec: EnvSpec, config: ReplayConfig, checkpoint_dir: str) -> Iterator[str]:
    """A ReplayServer in a child process for the duration of the block; yields its address."""
    ctx = multiprocessing.get_context("spawn")
    addresses, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(spec, config, checkpoint_dir, addresses, stop),
                       daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + config.timeout_seconds
        while True:
            try:
                address = addresses.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's replay server did not start "
                                       f"(exit code {proc.exitcode})") from None
        yield address
    finally:
        stop.set()
        proc.join(config.timeout_seconds)
        if proc.is_alive():
            proc.kill()


def _alternate(rounds: int, ours, raw) -> tuple[float, float]:
    """Sums ours(i) and raw(i) over the rounds in the order ours, raw, raw, ours, ... so that a
    slow drift of the machine's load costs both sides alike."""
    ours_s = raw_s = 0.0
    for i in range(rounds):
        if i % 2 == 0:
            ours_s += ours(i)
            raw_s += raw(i)
        else:
            raw_s += raw(i)
            ours_s += ours(i)
    return ours_s, raw_s


def _time_inserts(address: str, config: ReplayConfig, episodes: list[Episode],
                  rounds: int) -> tuple[float, float]:
    """(ours seconds, raw seconds) to insert `episodes` once each way."""
    adder = ReverbSequenceAdder(address, config)
    steps = [[{k: v[j] for k, v in records.items()} for j in range(len(records["reward"]))]
             for records in (episode_records(e, config.n_step) for e in episodes)]
    lengths = [e.length for e in episodes]
    timeout_ms = int(config.timeout_seconds * 1000)

    def ours(i: int) -> float:
        t0 = time.perf_counter()
        for episode in episodes[i::rounds]:
            adder.add_episode(episode)
        return time.perf_counter() - t0

    def raw(i: int, part: slice | None = None) -> float:
        part = part or slice(i, None, rounds)
        return raw_insert_seconds(address, config.table, steps[part], config.n_step,
                                  lengths[part], config.max_in_flight_items, timeout_ms)

    adder.add_episode(episodes[0])  # warm-up, both sides: column structure, chunkers
    raw(0, slice(0, 1))
    result = _alternate(rounds, ours, raw)
    adder.close()
    return result


def _time_samples(address: str, config: ReplayConfig, batch_size: int, num_batches: int,
                  rounds: int) -> tuple[float, float]:
    """(ours seconds, raw seconds) to draw `num_batches` batches each way."""
    warmup = config.prefetch_batches + 2  # after these our read-ahead queue runs empty
    count = lambda i: num_batches // rounds + (i < num_batches % rounds)  # noqa: E731

    def ours(i: int) -> float:
        batches = ReverbBatchIterator(address, config, batch_size)
        for _ in range(warmup):
            next(batches)
        t0 = time.perf_counter()
        for _ in range(count(i)):
            next(batches)
        seconds = time.perf_counter() - t0
        batches.close(wait_seconds=config.timeout_seconds)
        return seconds

    raw = lambda i: raw_sample_seconds(  # noqa: E731
        address, config.table, batch_size, count(i), warmup)
    return _alternate(rounds, ours, raw)


def bench_case(case: ReplayCase, rounds: int = 4, seed: int = 0) -> list[dict]:
    """The DESIGN §6 result rows of one case."""
    config = ReplayConfig(n_step=case.n_step, timeout_seconds=60.0)
    rng = np.random.default_rng(seed)
    episodes = [make_episode(case.spec, rng, case.episode_length)
                for _ in range(max(case.insert_episodes, 1))]
    num_items = sum(e.length for e in episodes)
    with tempfile.TemporaryDirectory() as tmp, \
            replay_process(case.spec, config, str(Path(tmp) / "ckpt")) as address:
        ours_ins, raw_ins = _time_inserts(address, config, episodes, rounds)
        expected = 2 * (num_items + episodes[0].length)  # both sides, warm-up included
        if (found := table_size(address, config.table)) != expected:
            raise RuntimeError(f"replay holds {found} items after the insert benchmark, "
                               f"expected {expected}")
        ours_smp, raw_smp = _time_samples(address, config, case.batch_size,
                                          case.sample_batches, rounds)
    sampled = case.sample_batches * case.batch_size

    def row(metric: str, items: int, ours_s: float, raw_s: float) -> dict:
        value, baseline = items / ours_s, items / raw_s
        return {"case": case.name, "metric": metric, "value": value, "unit": "1/s",
                "baseline": baseline, "ratio": value / baseline}

    return [
        row("insert_items_per_s", num_items, ours_ins, raw_ins),
        row("sample_items_per_s", sampled, ours_smp, raw_smp),
        {"case": case.name, "metric": "item_bytes", "value": item_bytes(case.spec, case.n_step),
         "unit": "B", "baseline": None, "ratio": None},
    ]


def run_replay_bench(json_path: str | None = None,
                     cases: Sequence[ReplayCase] = DEFAULT_CASES, rounds: int = 4) -> dict:
    """Runs every case; writes the report as JSON to `json_path` when given."""
    results = []
    for case in cases:
        results += bench_case(case, rounds)
    report = {"benchmark": "replay", "machine": machine(), "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report
