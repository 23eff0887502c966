"""Prometheus metrics of a run's processes, kept current while the work runs.

Every name, with its help text, is in cluster/metric_catalog.py (`METRICS`).

An actor's counters survive its restarts (`PersistentCounters`): a restarted actor continues
from what it last exported, so `pacflow_actor_*_total` only ever grow, and a dashboard sums
them across restarts without `rate()` tricks.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cluster.metric_catalog import LOSS_TERMS, PHASES, RETURN_BUCKETS, help_text, helps
from replay.storage import Storage


class PersistentCounters:
    """Counters and histograms whose values are kept in run storage (`metrics/state/<name>.json`)
    and restored by the process's next incarnation. `add` writes the new values first and
    exports them after, so an exported value is never above a stored one.

    Usage:
        counters = PersistentCounters(run, "actor-0", helps("actor"))
        registry.register(counters)
        task = (("task", "t"),)
        counters.add({("pacflow_actor_env_steps", task): 500},
                     {("pacflow_actor_episode_return", task): [12.5]})
    """

    def __init__(self, run: str, name: str, helps: dict[str, str],
                 buckets: tuple[float, ...] = RETURN_BUCKETS):
        self._store, self._key = Storage(run), f"metrics/state/{name}.json"
        self._helps, self._buckets = helps, buckets
        self._lock = threading.Lock()
        state = json.loads(self._store.get_bytes(self._key)) if self._store.exists(self._key) \
            else {"counters": [], "histograms": []}
        # (name, sorted label pairs) -> value | [bucket counts..., sum]
        self._counters = {(n, tuple(map(tuple, ls))): v for n, ls, v in state["counters"]}
        self._histograms = {(n, tuple(map(tuple, ls))): v for n, ls, v in state["histograms"]}

    def add(self, counts: dict | None = None, observations: dict | None = None) -> None:
        """Adds to counters ({(name, labels): amount}) and observes values into histograms
        ({(name, labels): [values]}); labels are ((key, value), ...)."""
        with self._lock:
            counters, histograms = dict(self._counters), dict(self._histograms)
            for key, amount in (counts or {}).items():
                counters[key] = counters.get(key, 0.0) + float(amount)
            for key, values in (observations or {}).items():
                cells = list(histograms.get(key, [0.0] * (len(self._buckets) + 2)))
                for v in values:
                    for i, bound in enumerate(self._buckets):
                        if v <= bound:
                            cells[i] += 1
                    cells[-2] += 1  # +Inf (the count)
                    cells[-1] += float(v)  # the sum
                histograms[key] = cells
            self._store.put_bytes(self._key, json.dumps({
                "counters": [[n, ls, v] for (n, ls), v in counters.items()],
                "histograms": [[n, ls, v] for (n, ls), v in histograms.items()]}).encode())
            self._counters, self._histograms = counters, histograms

    def collect(self) -> Iterator:
        with self._lock:
            counters, histograms = dict(self._counters), dict(self._histograms)
        for name in sorted({n for n, _ in counters}):
            keys = [k for k in counters if k[0] == name]
            family = CounterMetricFamily(name, self._helps.get(name, name),
                                         labels=[k for k, _ in keys[0][1]])
            for _, labels in keys:
                family.add_metric([v for _, v in labels], counters[(name, labels)])
            yield family
        for name in sorted({n for n, _ in histograms}):
            keys = [k for k in histograms if k[0] == name]
            family = HistogramMetricFamily(name, self._helps.get(name, name),
                                           labels=[k for k, _ in keys[0][1]])
            for _, labels in keys:
                cells = histograms[(name, labels)]
                bounds = [*(str(b) for b in self._buckets), "+Inf"]
                family.add_metric([v for _, v in labels],
                                  list(zip(bounds, cells[:-1])), sum_value=cells[-1])
            yield family


class FunctionCollector:
    """Gauges and counters read from a callable at every scrape (e.g. replay's server info):
    `spec` is [(name, type, labels, fn() -> {label values tuple: value})]."""

    def __init__(self, spec: Iterable[tuple[str, str, tuple[str, ...],
                                            Callable[[], dict[tuple, float]]]]):
        self._spec = list(spec)

    def collect(self) -> Iterator:
        for name, kind, labels, fn in self._spec:
            try:
                values = fn()
            except Exception:  # the source is down: the metric is absent, the scrape succeeds
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_text(name), labels=list(labels))
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family


class BusyClock:
    """Seconds spent in some state so far, the stretch in progress included."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total, self._since = 0.0, None

    def __enter__(self) -> "BusyClock":
        with self._lock:
            self._since = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._total += time.monotonic() - self._since
            self._since = None

    def seconds(self) -> float:
        with self._lock:
            running = time.monotonic() - self._since if self._since is not None else 0.0
            return self._total + running


class TimedIterator:
    """An iterator whose `next` calls are timed by a BusyClock (the learner's data wait)."""

    def __init__(self, iterator: Iterator, clock: BusyClock):
        self._iterator, self._clock = iterator, clock

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self):
        with self._clock:
            return next(self._iterator)


class LearnerMetrics:
    """The learner's metrics, updated after every update (`on_update`), and its history: one
    line per `window` updates in `<run>/metrics/history/learner/<first step>.jsonl`, written at
    the end of each train call (the HTML report's loss and throughput curves)."""

    def __init__(self, registry: CollectorRegistry, run: str, window: int = 25):
        self._store, self._window = Storage(run), window
        self.updates = Counter("pacflow_learner_updates", help_text("pacflow_learner_updates"),
                               registry=registry)
        self.loss = Gauge("pacflow_learner_loss", help_text("pacflow_learner_loss"), ["term"],
                          registry=registry)
        self.gauges = {k: Gauge(f"pacflow_learner_{k}", help_text(f"pacflow_learner_{k}"),
                                registry=registry)
                       for k in ("temperature", "q_mean", "grad_norm", "updates_per_second",
                                 "data_wait_fraction")}
        # Read at every scrape, the wait or train call in progress included: a learner blocked
        # on an empty or rate-limited replay shows as waiting while it waits.
        self.waiting, self.training = BusyClock(), BusyClock()
        registry.register(FunctionCollector([
            ("pacflow_learner_data_wait_seconds", "counter", (),
             lambda: {(): self.waiting.seconds()}),
            ("pacflow_learner_update_seconds", "counter", (),
             lambda: {(): self.training.seconds()})]))
        self._rows: list[dict] = []
        self._sums: dict[str, float] = {}
        self._count, self._first, self._started = 0, 0, time.monotonic()

    def start(self, first_step: int) -> None:
        """A train call begins after `first_step` updates."""
        self._rows, self._sums, self._count = [], {}, 0
        self._first, self._started = first_step, time.monotonic()

    def on_update(self, step: int, metrics: dict[str, float]) -> None:
        """After each update: counters and per-update gauges now; window means every `window`."""
        self.updates.inc()
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        if self._count == self._window:
            self._close_window(step)

    def _close_window(self, step: int) -> None:
        n, sums, now = self._count, self._sums, time.monotonic()
        mean = {k: v / n for k, v in sums.items()}
        row = {"learner_steps": step, "time": time.time(),
               **{k: mean[k] for k in (*LOSS_TERMS, "temperature", "q_mean", "grad_norm",
                                       "entropy") if k in mean},
               "updates_per_second": n / max(now - self._started, 1e-9),
               "data_wait_fraction": sums.get("data_wait_s", 0.0) /
               max(sums.get("step_s", 0.0), 1e-9)}
        for term in LOSS_TERMS:
            if term in row:
                self.loss.labels(term).set(row[term])
        for k, gauge in self.gauges.items():
            if k in row:
                gauge.set(row[k])
        self._rows.append(row)
        self._sums, self._count, self._started = {}, 0, now

    def finish(self, step: int) -> None:
        """A train call ended at `step` updates: closes the partial window, writes the history."""
        if self._count:
            self._close_window(step)
        if self._rows:
            self._store.put_bytes(f"metrics/history/learner/{self._first:010d}.jsonl",
                                  "".join(json.dumps(r) + "\n" for r in self._rows).encode())
        self._rows = []


class ActorMetrics:
    """A sim actor's metrics. Steps, episodes and returns are added once per wave, after the
    wave's episodes are written (`wave`), and survive restarts; version and staleness are read
    at every scrape."""

    def __init__(self, registry: CollectorRegistry, run: str, name: str,
                 acting: Callable[[], int], newest: Callable[[], tuple[int, float]]):
        self.counters = PersistentCounters(run, name, helps("actor"))
        registry.register(self.counters)
        self._acting, self._newest = acting, newest
        self._steps_per_second = 0.0
        registry.register(FunctionCollector([
            ("pacflow_actor_policy_version", "gauge", (), lambda: {(): acting()}),
            ("pacflow_actor_staleness_versions", "gauge", (),
             lambda: {(): max(newest()[0] - acting(), 0)}),
            ("pacflow_actor_staleness_seconds", "gauge", (), lambda: {(): self._stale_seconds()}),
            ("pacflow_actor_env_steps_per_second", "gauge", (),
             lambda: {(): self._steps_per_second}),
        ]))

    def _stale_seconds(self) -> float:
        version, received_at = self._newest()
        return max(time.time() - received_at, 0.0) if version > self._acting() else 0.0

    def wave(self, task: str, env_steps: int, seconds: float,
             episodes: Iterable[tuple[str, float]]) -> None:
        """One wave's steps, and its episodes as (mode, return), written already."""
        counts: dict = {("pacflow_actor_env_steps", (("task", task),)): env_steps}
        returns: dict = {}
        for mode, value in episodes:
            labels = (("mode", mode), ("task", task))
            counts[("pacflow_actor_episodes", labels)] = \
                counts.get(("pacflow_actor_episodes", labels), 0) + 1
            returns.setdefault(("pacflow_actor_episode_return", labels), []).append(value)
        self.counters.add(counts, returns)
        if env_steps:
            self._steps_per_second = env_steps / max(seconds, 1e-9)


def limiter_blocks(stats: dict) -> dict[str, bool]:
    """Whether Reverb's rate limiter would hold an insert or a sample now, from the server's
    counts: an insert waits while `inserts * spi - samples + spi > max_diff`, a sample while
    the table is below `min_size_to_sample` or `inserts * spi - samples - 1 < min_diff`."""
    diff = stats["inserts"] * stats["samples_per_insert"] - stats["samples"]
    return {"insert": diff + stats["samples_per_insert"] > stats["max_diff"],
            "sample": stats["items"] < stats["min_size_to_sample"] or
            diff - 1.0 < stats["min_diff"]}


class LimiterClock:
    """Seconds Reverb's rate limiter has held inserts and samples, sampled every `period`
    seconds (Reverb reports completed calls only, not time waited). Whether a caller was
    waiting meanwhile shows on the caller's side: the learner's data wait."""

    def __init__(self, stats: Callable[[], dict], period: float = 1.0):
        self.seconds = {"insert": 0.0, "sample": 0.0}
        self._stats, self._period = stats, period
        threading.Thread(target=self._run, name="limiter-clock", daemon=True).start()

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(self._period)
            now = time.monotonic()
            try:
                blocked = limiter_blocks(self._stats())
            except Exception:  # the server is restarting: nothing to count
                blocked = {}
            for op, held in blocked.items():
                if held:
                    self.seconds[op] += now - last
            last = now


def _cached(fn: Callable[[], dict], seconds: float) -> Callable[[], dict]:
    """fn's result, called again only when the last one is older than `seconds`."""
    lock, last = threading.Lock(), {"at": -float("inf"), "value": None}

    def cached() -> dict:
        with lock:
            if time.monotonic() - last["at"] > seconds:
                last["value"], last["at"] = fn(), time.monotonic()
            return last["value"]
    return cached


def replay_collector(stats: Callable[[], dict], last_checkpoint: Callable[[], float]
                     ) -> FunctionCollector:
    """Replay's metrics, read from the Reverb server's info at every scrape (ReplayServer)."""
    stats = _cached(stats, 0.5)  # one server_info call per scrape, not one per metric

    def one(key: str) -> Callable[[], dict]:
        return lambda: {(): stats()[key]}

    clock = LimiterClock(stats)
    return FunctionCollector([
        ("pacflow_replay_items", "gauge", (), one("items")),
        ("pacflow_replay_inserts", "counter", (), one("inserts")),
        ("pacflow_replay_samples", "counter", (), one("samples")),
        ("pacflow_replay_rate_limiter_blocked_seconds", "counter", ("op",),
         lambda: {(op,): v for op, v in clock.seconds.items()}),
        ("pacflow_replay_checkpoint_age_seconds", "gauge", (),
         lambda: {(): time.time() - last_checkpoint()}),
    ])


class RunMetrics:
    """The driver's view: cycle, phase, env steps in rows and the newest eval return."""

    def __init__(self, registry: CollectorRegistry):
        self.cycle = Gauge("pacflow_run_cycle", help_text("pacflow_run_cycle"), registry=registry)
        self._phase = Gauge("pacflow_run_phase", help_text("pacflow_run_phase"), ["phase"],
                            registry=registry)
        self.env_steps = Counter("pacflow_run_env_steps", help_text("pacflow_run_env_steps"),
                                 registry=registry)
        self.eval_return = Gauge("pacflow_run_eval_return", help_text("pacflow_run_eval_return"),
                                 registry=registry)
        self.phase("start")

    def phase(self, name: str) -> None:
        for p in PHASES:
            self._phase.labels(p).set(1.0 if p == name else 0.0)


def quarantine_collector(sink: "object") -> FunctionCollector:
    """Episodes an EpisodeSink quarantined, by the field of their first problem."""
    return FunctionCollector([("pacflow_episodes_quarantined", "counter", ("reason",),
                               lambda: {(r,): n for r, n in sink.rejected.items()})])
