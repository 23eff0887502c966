"""Raw Reverb baselines for `pacflow bench replay`: the same work as our adder and dataset,
written directly against the Reverb client, so the benchmark can report ours / raw.

Reverb and TensorFlow may only be imported inside `replay/` (DESIGN §1), so these loops live
here and `cluster/bench_replay.py` calls them with an address and plain arrays.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from replay.dataset import configure_tf_threads

Step = Mapping[str, np.ndarray]  # one record: column name -> array


def raw_insert_seconds(address: str, table: str, episodes: Sequence[Sequence[Step]],
                       n_step: int, num_items: Sequence[int], flush_every: int,
                       timeout_ms: int) -> float:
    """Seconds to write `episodes` (each a list of per-record dicts, already padded) as
    (n_step+1)-record items with a bare `TrajectoryWriter`: append every record, one item per
    transition from the history (as Acme's adders do), the same flush cadence as our adder, and
    `end_episode` after each episode. Items are confirmed by the server when this returns."""
    import reverb

    L = n_step + 1
    writer = reverb.Client(address).trajectory_writer(num_keep_alive_refs=L)
    t0 = time.perf_counter()
    created = 0
    for steps, items in zip(episodes, num_items):
        for j, step in enumerate(steps):
            writer.append(step)
            if n_step <= j < n_step + items:
                history = writer.history
                writer.create_item(table, priority=1.0,
                                   trajectory={k: history[k][-L:] for k in step})
                created += 1
                if created % flush_every == 0:
                    writer.flush(block_until_num_items=flush_every, timeout_ms=timeout_ms)
        writer.end_episode(clear_buffers=True, timeout_ms=timeout_ms)
    seconds = time.perf_counter() - t0
    writer.close()
    return seconds


def raw_sample_seconds(address: str, table: str, batch_size: int, num_batches: int,
                       warmup_batches: int) -> float:
    """Seconds to draw `num_batches` batches of `batch_size` items with a bare
    `reverb.TrajectoryDataset` (tf.data, eager tensors), after `warmup_batches`. The dataset is
    built as ours is: same in-flight samples, batching and prefetch, one TF thread."""
    configure_tf_threads()
    import reverb

    dataset = reverb.TrajectoryDataset.from_table_signature(
        address, table, max_in_flight_samples_per_worker=2 * batch_size)
    batches = iter(dataset.batch(batch_size, drop_remainder=True).prefetch(1))
    for _ in range(warmup_batches):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return time.perf_counter() - t0


def table_size(address: str, table: str, timeout_seconds: int = 60) -> int:
    """Items currently in `table`."""
    import reverb

    info = reverb.Client(address).server_info(timeout=timeout_seconds)
    return int(info[table].current_size)
