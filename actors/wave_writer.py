"""Episode writes off the acting thread: a wave's episodes are written while the next wave acts.

Validation, the Parquet archive (with its fsync) and the replay write are a sizeable share of an
actor's time on small tasks (docs/benchmarks.md "Actors"). Done after each wave on the acting
thread, they stall the next wave; here one background thread does them, and the caller
collects each wave's result later. At most one wave is written while the next acts: `submit`
first finishes the previous wave, so an actor holds at most two waves of episodes.

Usage:
    writer = WaveWriter(write)                  # write(wave) -> result, on one thread
    for i in range(num_waves):
        episodes = loop.run(...)
        for done in writer.submit(episodes, tag=i):   # the previous wave, when written
            ...                                  # done.tag, done.result, done.waited
    for done in writer.finish():                 # the last wave
        ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Generic, TypeVar

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Written(Generic[R]):
    """One wave, written."""

    tag: Any  # what the caller passed with the wave
    result: R  # what write() returned for it
    waited: float  # seconds the caller blocked waiting for this write (~0 when it had ended)


class WaveWriter(Generic[R]):
    """Runs `write(wave)` for each submitted wave (its episodes, and whatever else `write`
    needs) on one background thread, in order.

    An exception from `write` is raised by the `submit` or `finish` that collects its wave;
    the waves after it are not written (`submit` raises before handing its wave over)."""

    def __init__(self, write: Callable[[Any], R]):
        self._write = write
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wave-writer")
        self._pending: tuple[concurrent.futures.Future, Any] | None = None

    def submit(self, wave: Any, tag: Any = None) -> list[Written[R]]:
        """Hands a wave to the writer thread once the previous wave is written; returns that
        previous wave (or nothing, for the first)."""
        done = self.finish()
        self._pending = (self._pool.submit(self._write, wave), tag)
        return done

    def finish(self) -> list[Written[R]]:
        """Blocks until the wave being written (if any) is; returns it."""
        if self._pending is None:
            return []
        (future, tag), self._pending = self._pending, None
        started = time.monotonic()
        result = future.result()  # raises what write() raised
        return [Written(tag, result, time.monotonic() - started)]

    def discard(self) -> None:
        """Waits for a wave still being written and drops its result or error: what a caller
        does before new waves when its previous call failed midway."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending[0]])
            self._pending = None

    def close(self) -> None:
        """Waits for a wave still being written (its result and any error are dropped)."""
        self._pending = None
        self._pool.shutdown(wait=True)
