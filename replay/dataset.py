"""Reverb -> torch: an iterator of learner batches.

Sampling and batching run in Reverb's C++ dataset (`reverb.TrajectoryDataset`, TensorFlow's
runtime, one thread), outside the Python GIL; a daemon thread turns the batches into torch tensors
(pinned when the learner is on CUDA) and keeps a few ready.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Iterator

import numpy as np
import torch

from replay.config import ReplayConfig
from replay.reconnect import (Resolver, announced, new_incarnation, server_answers,
                              wait_until_answers)
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
    the network. When no item can be sampled for `config.stall_timeout_seconds` (an empty table,
    or a rate limiter holding the learner back) it logs a stall, counts it in `num_stalls`, and
    goes on waiting: data arriving later resumes it.

    While `next` waits it checks every PROBE_SECONDS that the server still answers (a dead
    server leaves Reverb's dataset blocked for good). A server that stops answering for
    `config.timeout_seconds`, or an error in the thread, raises RuntimeError from `next`; the
    thread that failed is replaced, so a later `next` samples again rather than waiting on a
    thread that no longer exists. With a
    resolver (replay/reconnect.py), a new incarnation of the server that Ray restarted, at any
    address, is sampled instead by a new thread (`num_reconnects`; the stuck one is abandoned).
    `interrupt()` (from another thread) ends the iterator: a `next` blocked on data, and every
    later one, raises StopIteration.

    Usage:
        batches = ReverbBatchIterator(address, ReplayConfig(), batch_size=256)
        batch = next(batches)
    """

    PROBE_SECONDS = 5.0

    def __init__(self, address: str, config: ReplayConfig, batch_size: int,
                 pin_memory: bool = False, resolve: Resolver | None = None):
        self._address, self._resolve = address, resolve
        self._address, self._incarnation = announced(resolve, address)
        self._config, self._batch_size, self._pin = config, batch_size, pin_memory
        # (generation, Batch or Exception): a thread's output counts only while it is current
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self.num_stalls = 0
        self.num_reconnects = 0  # times a restarted server was found and sampled instead
        self._stop = threading.Event()
        self._interrupted = threading.Event()
        self._generation = 0
        self._start_thread()

    def _start_thread(self) -> None:
        self._generation += 1
        self._thread = threading.Thread(target=self._fill, args=(self._generation, self._address),
                                        name="reverb-prefetch", daemon=True)
        self._thread.start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._stop.is_set()

    def _fill(self, generation: int, address: str) -> None:
        while self._current(generation):
            try:
                for sample in _batched_dataset(address, self._config, self._batch_size):
                    if not self._current(generation):
                        return
                    self._put((generation, to_batch(sample.data, self._pin)), generation)
            except Exception as e:  # __next__ decides: a restarted server, or an error
                self._put((generation, e), generation)
                return
            # The dataset ends when its rate limiter times out: nothing to sample.
            self.num_stalls += 1
            log.warning("replay stalled: no batch from table %r for %.0fs (stall %d); "
                        "waiting for data", self._config.table,
                        self._config.stall_timeout_seconds, self.num_stalls)

    def _put(self, item: tuple, generation: int) -> None:
        while self._current(generation):
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _replaced(self) -> bool:
        """Whether a new incarnation of the server was found; it is sampled from now on."""
        if self._resolve is None:
            return False
        found = new_incarnation(self._resolve, self._incarnation, self._address,
                                self._config.timeout_seconds)
        if found is None:
            return False
        (self._address, self._incarnation), self.num_reconnects = found, self.num_reconnects + 1
        log.warning("replay restarted: sampling from %s (reconnect %d)", self._address,
                    self.num_reconnects)
        self._start_thread()
        return True

    def _check_server(self) -> None:
        """Called while waiting: a server gone for timeout_seconds is replaced or an error."""
        if server_answers(self._address, 2.0) or self._replaced():
            return
        if not wait_until_answers(self._address, self._config.timeout_seconds):
            raise RuntimeError(f"replay {self._address} has not answered for "
                               f"{self._config.timeout_seconds:.0f}s (replay.timeout_seconds)")

    def __next__(self) -> Batch:
        probe = time.monotonic() + self.PROBE_SECONDS
        while True:
            if self._interrupted.is_set():
                raise StopIteration
            try:
                generation, item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() >= probe:
                    self._check_server()
                    probe = time.monotonic() + self.PROBE_SECONDS
                continue
            if generation != self._generation:
                continue  # from a thread abandoned for a restarted server
            if isinstance(item, Exception):
                if self._replaced():
                    continue
                self._start_thread()  # the failed thread has ended: a later `next` samples anew
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
