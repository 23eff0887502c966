"""Replay configuration (import-light)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The Reverb table that holds every collected transition of the run."""

    table: str = "replay"  # Reverb table name
    n_step: int = 1  # items hold n_step + 1 records; the learner uses n-step returns
    max_size: int = 1_000_000  # items kept; FIFO removal beyond it
    min_size_to_sample: int = 1  # MinSize rate limiter: samples wait until this many items
    max_in_flight_items: int = 64  # adder back-pressure: unconfirmed items before it blocks
    timeout_seconds: float = 60.0  # deadline for adder flushes and server calls
    prefetch_batches: int = 4  # batches the dataset reads ahead in its thread

    def __post_init__(self) -> None:
        for name in ("n_step", "max_size", "min_size_to_sample", "max_in_flight_items",
                     "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"replay.{name}={getattr(self, name)} must be >= 1")
        if self.min_size_to_sample > self.max_size:
            raise ValueError(f"replay.min_size_to_sample={self.min_size_to_sample} exceeds "
                             f"replay.max_size={self.max_size}")
