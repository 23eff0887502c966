"""Live progress of a cycle in the terminal: episodes per actor, learner updates with rate and
ETA, and evaluation, read from the run's own metrics endpoints (the file_sd targets in
`<run>/metrics/targets/`), so what the terminal shows is what Prometheus scrapes.

On a terminal it is a `rich` progress display that disappears when the phase ends (the
per-cycle table stays); elsewhere (`ray job submit`, a pipe, a log file) it is a plain line
every `plain_every` seconds.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Callable, TextIO

from prometheus_client.parser import text_string_to_metric_families

from cluster.discovery import endpoints

if TYPE_CHECKING:
    from cluster.metrics import RunMetrics


def scrape(address: str, timeout: float = 2.0) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the metrics progress shows (COUNTED), from
    one /metrics endpoint (a restricted scrape: not what a process's final scrape waits
    for, cluster/process.py ScrapeClock)."""
    names = sorted({name for name, _, _ in CycleProgress.COUNTED.values()})
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    with urllib.request.urlopen(f"http://{address}/metrics?{query}", timeout=timeout) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, val) in ls for k, val in labels.items()))


class CycleProgress:
    """Usage (the driver):
        progress = CycleProgress(run, out)
        progress.phase(cycle, "collect", {"actor-0": 8, "actor-1": 8})
        ...
        progress.phase(cycle, "train", {"learner": 1000})
        progress.close()
    """

    def __init__(self, run: str, out: TextIO, tty: bool | None = None,
                 plain_every: float = 10.0, poll: float = 1.0,
                 read: Callable[[str], dict] = scrape):
        self._run, self._out, self._read = run, out, read
        self._tty = out.isatty() if tty is None else tty
        self._plain_every, self._poll = plain_every, poll
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._phase: tuple[int, str, dict[str, int]] | None = None
        self._base: dict[str, float] = {}
        self._started = time.monotonic()
        self._last_plain = 0.0
        self._live = None
        self._endpoints: dict[str, str] = {}
        if self._tty:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                      TimeRemainingColumn(),
                                      console=Console(file=out, force_terminal=True),
                                      transient=True, redirect_stdout=False,
                                      redirect_stderr=False)
            self._tasks: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run_loop, name="progress", daemon=True)
        self._thread.start()

    # What each phase counts, per process: (metric, labels, unit).
    COUNTED = {"collect": ("pacflow_actor_episodes_total", {"mode": "collect"}, "episodes"),
               "evaluate": ("pacflow_actor_episodes_total", {"mode": "eval"}, "episodes"),
               "train": ("pacflow_learner_updates_total", {}, "updates")}

    def say(self, text: str) -> None:
        """A line for the terminal: above the live display while it shows."""
        if self._tty and self._live:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self._out, flush=True)

    def phase(self, cycle: int, name: str, totals: dict[str, int] | None = None) -> None:
        """A new phase: `totals` is what each process will count in it (none: nothing shown).
        Never raises: progress is best effort, the run goes on without it."""
        try:
            self._endpoints = endpoints(self._run) if totals else {}
            base = {p: self._count(name, p) for p in (totals or {})}
        except Exception:  # storage or an endpoint unreadable now: counted from 0
            base = {}
        with self._lock:
            self._phase, self._base = (cycle, name, dict(totals or {})), base
            self._started, self._last_plain = time.monotonic(), time.monotonic()
            if self._tty:
                for task in self._tasks.values():
                    self._progress.remove_task(task)
                self._tasks = {p: self._progress.add_task(f"cycle {cycle} {name} {p}",
                                                          total=n, rate="")
                               for p, n in (totals or {}).items()}
                if self._tasks and self._live is None:
                    self._progress.start()
                    self._live = True

    def _count(self, phase: str, process: str) -> float:
        if phase not in self.COUNTED:
            return 0.0
        name, labels, _ = self.COUNTED[phase]
        try:
            address = self._endpoints.get(process)
            if address is None:  # announced since the phase began, or moved by a restart
                self._endpoints = endpoints(self._run)
                address = self._endpoints.get(process)
            if address is None:
                return float("nan")
            return total(self._read(address), name, **labels)
        except Exception:  # a restarting process, a torn reply: counted at the next poll
            self._endpoints.pop(process, None)
            return float("nan")

    def _state(self) -> list[tuple[str, float, int, float]]:
        """[(process, done, total, per second)] of the phase in progress."""
        with self._lock:
            if self._phase is None:
                return []
            _, name, totals = self._phase
            base, elapsed = dict(self._base), time.monotonic() - self._started
        rows = []
        for process, n in totals.items():
            now = self._count(name, process)
            if now != now:  # unreadable right now
                continue
            start = base.get(process, float("nan"))
            if start != start:  # unreadable at the phase start: counted from now on
                with self._lock:
                    self._base[process] = start = now
            done = max(now - start, 0.0)
            rows.append((process, min(done, n), n, done / max(elapsed, 1e-9)))
        return rows

    def _run_loop(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self._update()
            except Exception:  # progress is best effort: never stop the run for it
                continue

    def _update(self) -> None:
        rows = self._state()
        with self._lock:
            if self._phase is None:
                return
            cycle, name, _ = self._phase
            unit = self.COUNTED.get(name, ("", {}, ""))[2]
            if self._tty:
                for process, done, n, rate in rows:
                    if process in self._tasks:
                        self._progress.update(self._tasks[process], completed=done,
                                              rate=f"{rate:.1f} {unit}/s")
                return
            now = time.monotonic()
            if not rows or now - self._last_plain < self._plain_every:
                return
            self._last_plain = now
        parts = []
        for process, done, n, rate in rows:
            eta = (n - done) / rate if rate > 0 else float("inf")
            parts.append(f"{process} {done:.0f}/{n} {unit} ({rate:.1f}/s, ETA "
                         f"{eta:.0f} s)" if eta != float("inf") else
                         f"{process} {done:.0f}/{n} {unit}")
        print(f"  cycle {cycle} {name}: " + ", ".join(parts), file=self._out, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._tty and self._live:
            self._progress.stop()


class RunView:
    """What the driver shows of a run while it works: the run's metrics (cycle, phase) and the
    live progress. `enter(cycle, phase, totals)` at each phase of a cycle."""

    def __init__(self, metrics: "RunMetrics", progress: CycleProgress | None, out: TextIO):
        self.metrics, self.progress, self._out = metrics, progress, out

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.say(text)
        else:
            print(text, file=self._out, flush=True)

    def enter(self, cycle: int, phase: str, totals: dict[str, int] | None = None) -> None:
        self.metrics.cycle.set(cycle)
        self.metrics.phase(phase)
        if self.progress is not None:
            self.progress.phase(cycle, phase, totals)

    def close(self) -> None:
        self.metrics.phase("done")
        if self.progress is not None:
            self.progress.close()
