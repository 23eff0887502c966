"""Reverb -> torch: an iterator of learner batches.

Sampling and batching run in Reverb's C++ dataset (`reverb.TrajectoryDataset`, TensorFlow's
runtime, one thread), outside the Python GIL; a daemon thread turns the batches into torch tensors
(pinned when the learner is on CUDA) and keeps a few ready.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from replay.config import ReplayConfig
from replay.spec import Batch

log = logging.getLogger(__name__)


def to_batch(data: dict[str, np.ndarray], pin_memory: bool = False) -> Batch:
    """Batched item columns, each (B, n+1, ...), -> Batch."""
    col = lambda k: torch.from_numpy(np.array(data[k]))  # noqa: E731  (TF arrays are read-only)
    batch = Batch(
        observation=col("observation"), action=col("action"), reward=col("reward"),
        discount=col("discount"), mask=col("mask"),
        task_id=col("task_id")[:, 0].long(), policy_version=col("policy_version")[:, 0].long(),
        pixels=col("pixels") if "pixels" in data else None,
    )
    if pin_memory:
        batch = batch.map(torch.Tensor.pin_memory)
    return batch


def stack_batch(items: list[dict[str, np.ndarray]], pin_memory: bool = False) -> Batch:
    """Stacks single items (each a dict of (n+1, ...) arrays) into a Batch."""
    return to_batch({k: np.stack([it[k] for it in items]) for k in items[0]}, pin_memory)


class ReverbBatchIterator(Iterator[Batch]):
    """Yields Batches of `batch_size` items sampled uniformly from the table.

    A daemon thread keeps `config.prefetch_batches` batches ready so the learner does not wait on
    the network. Errors in the thread are re-raised from `__next__`. When no item can be sampled
    for `config.stall_timeout_seconds` (an empty table, or a rate limiter holding the learner back)
    it logs a stall, counts it in `num_stalls`, and goes on waiting: data arriving later resumes it.
    `interrupt()` (from another thread) ends the iterator: a `next` blocked on data, and every
    later one, raises StopIteration.

    Usage:
        batches = ReverbBatchIterator(address, ReplayConfig(), batch_size=256)
        batch = next(batches)
    """

    def __init__(self, address: str, config: ReplayConfig, batch_size: int,
                 pin_memory: bool = False):
        self._address = address
        self._config, self._batch_size, self._pin = config, batch_size, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self.num_stalls = 0
        self._stop = threading.Event()
        self._interrupted = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="reverb-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                for sample in _batched_dataset(self._address, self._config, self._batch_size):
                    if self._stop.is_set():
                        return
                    self._put(to_batch(sample.data, self._pin))
                # The dataset ends when its rate limiter times out: nothing to sample.
                self.num_stalls += 1
                log.warning("replay stalled: no batch from table %r for %.0fs (stall %d); "
                            "waiting for data", self._config.table,
                            self._config.stall_timeout_seconds, self.num_stalls)
        except Exception as e:  # surfaced to the learner by __next__
            log.exception("replay prefetch failed")
            self._queue.put(e)

    def _put(self, batch: Batch) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def __next__(self) -> Batch:
        while True:
            if self._interrupted.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if isinstance(item, Exception):
            raise RuntimeError("replay sampling failed") from item
        return item

    def interrupt(self) -> None:
        """Ends the iteration; safe from any thread."""
        self._interrupted.set()

    def close(self, wait_seconds: float = 0.0) -> None:
        """Stops the prefetch thread; waits up to `wait_seconds` for it to end."""
        self._stop.set()
        if wait_seconds > 0:
            self._thread.join(wait_seconds)


def configure_tf_threads() -> None:
    """One TF thread: the learner's torch threads need the cores. Only effective before TF's
    runtime starts in this process; later calls change nothing."""
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process
        pass


def _batched_dataset(address: str, config: ReplayConfig, batch_size: int) -> Iterator:
    configure_tf_threads()
    import reverb

    dataset = reverb.TrajectoryDataset.from_table_signature(
        address, config.table, max_in_flight_samples_per_worker=2 * batch_size,
        rate_limiter_timeout_ms=int(config.stall_timeout_seconds * 1000))
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(1)
    return dataset.as_numpy_iterator()
