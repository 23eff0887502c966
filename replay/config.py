"""Replay configuration (import-light)."""

from __future__ import annotations

import dataclasses
import enum


class Sampler(enum.Enum):
    """How the learner's items are drawn."""

    UNIFORM = "uniform"
    PRIORITIZED = "prioritized"  # proportional to priority ** priority_exponent


class RateLimiter(enum.Enum):
    """What holds the learner's samples-per-insert."""

    MIN_SIZE = "min_size"  # sample freely once min_size_to_sample items exist
    SAMPLE_TO_INSERT = "sample_to_insert"  # keep samples/inserts near samples_per_insert


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The Reverb table that holds every collected transition of the run."""

    table: str = "replay"  # Reverb table name
    n_step: int = 1  # items hold n_step + 1 records; the learner uses n-step returns
    max_size: int = 1_000_000  # items kept; FIFO removal beyond it
    min_size_to_sample: int = 1  # samples wait until this many items exist
    sampler: Sampler = Sampler.UNIFORM  # uniform or prioritized sampling
    priority_exponent: float = 0.6  # prioritized: sampling probability ∝ priority ** this
    rate_limiter: RateLimiter = RateLimiter.MIN_SIZE  # min_size or sample_to_insert
    samples_per_insert: float = 32.0  # sample_to_insert: target samples per inserted item
    error_buffer: float = 1000.0  # sample_to_insert: allowed deviation, in samples
    stall_timeout_seconds: float = 30.0  # the learner reports a stall after this long unfed
    max_in_flight_items: int = 64  # adder back-pressure: unconfirmed items before it blocks
    timeout_seconds: float = 60.0  # deadline for adder flushes and server calls
    prefetch_batches: int = 4  # batches the dataset reads ahead in its thread

    def __post_init__(self) -> None:
        for name in ("n_step", "max_size", "min_size_to_sample", "max_in_flight_items",
                     "prefetch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"replay.{name}={getattr(self, name)} must be >= 1")
        if self.samples_per_insert <= 0 or self.error_buffer <= 0 \
                or self.stall_timeout_seconds <= 0 or self.priority_exponent < 0:
            raise ValueError("replay.samples_per_insert, replay.error_buffer and "
                             "replay.stall_timeout_seconds must be > 0, "
                             "replay.priority_exponent >= 0")
        if self.min_size_to_sample > self.max_size:
            raise ValueError(f"replay.min_size_to_sample={self.min_size_to_sample} exceeds "
                             f"replay.max_size={self.max_size}")
