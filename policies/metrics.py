"""The policy server's own metrics (published version, subscribers, push and Act latency,
uploads by result). A server made without a registry measures nothing (`ServerMetrics()`).
The names are in cluster/metric_catalog.py's METRICS list with the rest of a run's."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PUSH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ACT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPLOAD_RESULTS = ("stored", "duplicate", "quarantined", "refused")


class ServerMetrics:
    """Usage: `ServerMetrics(registry, latest=lambda: store.latest)`; the servicer calls
    `subscribed()` around each stream, `pushed(seconds)`, `uploaded(result)` and `acting()`."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 latest: Callable[[], int] | None = None):
        self._on = registry is not None
        self._lock = threading.Lock()
        if not self._on:
            return
        published = Gauge("pacflow_policy_published_version", "newest published version",
                          registry=registry)
        if latest is not None:
            published.set_function(latest)
        self._subscribers = Gauge("pacflow_policy_subscribers", "open Subscribe streams",
                                  registry=registry)
        self._push = Histogram("pacflow_policy_push_seconds",
                               "time to stream one version to one subscriber",
                               buckets=PUSH_BUCKETS, registry=registry)
        self._uploads = Counter("pacflow_policy_uploads", "robot uploads by result",
                                ["result"], registry=registry)
        for result in UPLOAD_RESULTS:  # every result exported from the start, at 0
            self._uploads.labels(result)
        self._act = Histogram("pacflow_policy_act_seconds", "Act call latency",
                              buckets=ACT_BUCKETS, registry=registry)

    @contextlib.contextmanager
    def subscribed(self) -> Iterator[None]:
        if self._on:
            self._subscribers.inc()
        try:
            yield
        finally:
            if self._on:
                self._subscribers.dec()

    def pushed(self, seconds: float) -> None:
        if self._on:
            self._push.observe(seconds)

    def uploaded(self, result: str) -> None:
        if self._on:
            self._uploads.labels(result).inc()

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._on:
                self._act.observe(time.perf_counter() - t0)
