"""Reverb -> torch: an iterator of learner batches, sampled and stacked in a background thread."""

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


def stack_batch(items: list[dict[str, np.ndarray]], pin_memory: bool = False) -> Batch:
    """Stacks sampled items (each a dict of (n+1, ...) arrays) into a Batch."""
    col = lambda k: torch.from_numpy(np.stack([it[k] for it in items]))  # noqa: E731
    batch = Batch(
        observation=col("observation"), action=col("action"), reward=col("reward"),
        discount=col("discount"), mask=col("mask"),
        task_id=col("task_id")[:, 0].long(), policy_version=col("policy_version")[:, 0].long(),
    )
    if pin_memory:
        batch = Batch(**{k: v.pin_memory() for k, v in vars(batch).items()})
    return batch


class ReverbBatchIterator(Iterator[Batch]):
    """Yields Batches of `batch_size` items sampled uniformly from the table.

    A daemon thread keeps `config.prefetch_batches` batches ready so the learner does not wait on
    the network. Errors in the thread are re-raised from `__next__`.

    Usage:
        batches = ReverbBatchIterator(address, ReplayConfig(), batch_size=256)
        batch = next(batches)
    """

    def __init__(self, address: str, config: ReplayConfig, batch_size: int,
                 pin_memory: bool = False):
        import reverb

        self._client = reverb.Client(address)
        self._config, self._batch_size, self._pin = config, batch_size, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="reverb-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                samples = self._client.sample(self._config.table, num_samples=self._batch_size,
                                              emit_timesteps=False,
                                              unpack_as_table_signature=True)
                batch = stack_batch([s.data for s in samples], self._pin)
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # surfaced to the learner by __next__
            log.exception("replay prefetch failed")
            self._queue.put(e)

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise RuntimeError("replay sampling failed") from item
        return item

    def close(self) -> None:
        self._stop.set()
