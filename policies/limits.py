"""Bounds on what callers of the policy server and gateway may hold: bytes, time, and streams.

Robots reach the gateway from outside the cluster, so one slow, large or greedy caller must not
exhaust the server's memory or its handler threads. Every limit here is documented with its
default in docs/security.md.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from typing import Iterator

import grpc

from policies.security import caller

# Trailing metadata of a refusal that retrying cannot mend (an upload over a size limit). A
# RESOURCE_EXHAUSTED without it is a busy server (stream slots, handler threads): retry later.
PERMANENT_REFUSAL = ("pacflow-refusal", "permanent")


def is_permanent(error: grpc.RpcError) -> bool:
    """Whether the server marked this refusal as one retrying cannot mend."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return tuple(PERMANENT_REFUSAL) in {tuple(m) for m in metadata or ()}


# Roles that share only the total stream cap: they run inside the cluster, many under one
# identity (every sim actor holds the "actor" token), and are sized by the run's config.
IN_CLUSTER_ROLES = frozenset({"actor", "learner"})


@dataclasses.dataclass(frozen=True)
class GatewayLimits:
    """What one policy server allows; the defaults suit a fleet of a few dozen robots."""

    max_upload_bytes: int = 256 << 20  # one episode upload (its Parquet bytes), enforced while
    #                                    receiving; over it: RESOURCE_EXHAUSTED
    max_decoded_bytes: int = 1 << 30  # an upload's decoded arrays; decoded in a helper process
    #                                   whose memory is capped to match (policies/decode.py);
    #                                   over it: RESOURCE_EXHAUSTED
    upload_deadline_seconds: float = 300.0  # an upload still receiving after this is cancelled
    act_deadline_seconds: float = 10.0  # an Act waits at most this long, whatever the caller asks
    fetch_deadline_seconds: float = 600.0  # a Fetch still sending after this is cancelled (a
    #                                        client that stops reading holds a thread until then)
    handler_threads: int = 64  # gRPC handler threads; calls beyond them are refused at once
    max_streams_total: int = 48  # Subscribe, Fetch and UploadEpisode calls in progress, in all
    #                              (leaves handler threads for Act, List, Pin and Publish)
    max_streams_per_identity: int = 4  # ... per robot or operator identity; in-cluster roles
    #                                    and callers without tokens share the total only
    max_backlog_versions: int = 4  # an every_version subscriber behind by more receives only
    #                                the newest this many (older ones are skipped, not re-read)
    spool_dir: str = ""  # uploads are received into temp files here ("" = the system temp dir)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "spool_dir" and not value > 0:
                raise ValueError(f"gateway.{field.name}={value} must be > 0")
        if self.max_streams_total >= self.handler_threads:
            raise ValueError(f"gateway.max_streams_total={self.max_streams_total} must be below "
                             f"gateway.handler_threads={self.handler_threads}, or long streams "
                             "could take every thread")


class StreamSlots:
    """Counts the long calls in progress, in all and per caller; refuses calls over the caps.

    Usage:
        with slots.hold(context):   # aborts with RESOURCE_EXHAUSTED when over a cap
            ...
    """

    def __init__(self, total: int, per_identity: int):
        self._total, self._per_identity = total, per_identity
        self._lock = threading.Lock()
        self._in_use = 0
        self._by_key: collections.Counter[str] = collections.Counter()

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    def try_acquire(self, key: str | None) -> str:
        """"" when a slot was taken (release it with `release(key)`), else why not."""
        with self._lock:
            if self._in_use >= self._total:
                return f"the server holds {self._total} streams, its limit; retry later"
            if key is not None and self._by_key[key] >= self._per_identity:
                return (f"{key} holds {self._per_identity} streams, the limit per caller; close "
                        "one or retry later")
            self._in_use += 1
            if key is not None:
                self._by_key[key] += 1
            return ""

    def release(self, key: str | None) -> None:
        with self._lock:
            self._in_use -= 1
            if key is not None:
                self._by_key[key] -= 1
                if not self._by_key[key]:
                    del self._by_key[key]

    @contextlib.contextmanager
    def hold(self, context: grpc.ServicerContext) -> Iterator[None]:
        key = caller_key()
        refusal = self.try_acquire(key)
        if refusal:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            yield
        finally:
            self.release(key)


def caller_key() -> str | None:
    """Whom a call counts against: the robot's or operator's identity; None for in-cluster
    roles and for callers without tokens (plaintext is loopback only: the run's own
    processes), which share only the total."""
    who = caller()
    return None if who is None or who.role in IN_CLUSTER_ROLES else who.identity


@contextlib.contextmanager
def cancel_after(context: grpc.ServicerContext, seconds: float) -> Iterator[threading.Event]:
    """Cancels the call if it is still running after `seconds` (a server-side deadline: a
    client that stops sending no longer holds a thread and a spool file for ever). Yields an
    event that is set when the deadline fired."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        context.cancel()
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
