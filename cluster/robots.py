"""Robots in a run: the fleet ledger and the collect phase's wait for robot episodes.

The run's policy server is the robots' gateway. Each episode it accepts (archived now, or found
archived already after a retry) is counted once in `<run>/fleet/<robot>.json`: episodes per
policy version, their returns, the last upload. A cycle that collects with version v waits until
`loop.robot_episodes_per_cycle` episodes acted by v are in (episodes of older versions are
trained on, off-policy, but do not count), showing per-robot progress; past
`loop.robot_timeout_seconds` it continues with what arrived or waits for the operator's
`pacflow fleet continue RUN` (`loop.robot_on_timeout`).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Callable

from cluster.config import RobotTimeout
from replay.ingest import Ingested
from replay.spec import Episode
from replay.storage import Storage, join

FLEET_DIR = "fleet"


@dataclasses.dataclass
class RobotRecord:
    """What one robot has uploaded to the run (one JSON file per robot)."""

    robot_id: str
    episodes: dict[str, int] = dataclasses.field(default_factory=dict)  # version -> accepted
    returns: dict[str, float] = dataclasses.field(default_factory=dict)  # version -> their sum
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # version -> decisions
    counted: list[str] = dataclasses.field(default_factory=list)  # episode ids counted
    last_upload: float = 0.0  # unix seconds of the last accepted upload
    last_version: int = 0  # version that acted its last accepted episode
    quarantined: int = 0  # uploads refused by validation
    # Its last status report (RobotStatus) and when it came: `status/<robot>.json`, a small
    # file of its own, since reports come every few seconds.
    status: dict = dataclasses.field(default_factory=dict, compare=False)
    last_report: float = dataclasses.field(default=0.0, compare=False)

    def counts(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("status", "last_report")}

    @property
    def total(self) -> int:
        return sum(self.episodes.values())


class FleetLedger:
    """Counts each robot's accepted episodes once, in run storage (it survives restarts).

    Usage (inside the run's policy server process, around the upload handler):
        ledger = FleetLedger(run)
        result = sink.ingest(episode, to_replay=True)
        ledger.record(episode, result)
    """

    def __init__(self, run: str):
        self._store = Storage(join(run, FLEET_DIR))
        self._lock = threading.Lock()  # uploads and reports arrive on gRPC threads
        self.robots: dict[str, RobotRecord] = {}
        self._counted: dict[str, set[str]] = {}  # robot -> its counted ids, for lookups
        for store in (self._store, self._store.child("status")):
            names = store.list_files() if store.exists() else []
            for name in sorted(n for n in names if n.endswith(".json")):
                data = json.loads(store.get_bytes(name))
                robot = self._robot(data.pop("robot_id"))
                for key, value in data.items():  # counts, or (in status/) the last report
                    setattr(robot, key, value)
                self._counted[robot.robot_id] = set(robot.counted)

    def _robot(self, robot_id: str) -> RobotRecord:
        self._counted.setdefault(robot_id, set())
        return self.robots.setdefault(robot_id, RobotRecord(robot_id))

    def record(self, episode: Episode, result: Ingested) -> None:
        with self._lock:
            self._record(episode, result)

    def _record(self, episode: Episode, result: Ingested) -> None:
        lineage = episode.lineage
        robot = self._robot(lineage.actor_id)
        if result.problems:
            robot.quarantined += 1
        elif lineage.episode_id not in self._counted[robot.robot_id]:  # new, or a cut write
            version = str(lineage.policy_version)
            robot.episodes[version] = robot.episodes.get(version, 0) + 1
            robot.returns[version] = robot.returns.get(version, 0.0) + episode.episode_return
            robot.steps[version] = robot.steps.get(version, 0) + episode.length
            robot.counted.append(lineage.episode_id)
            self._counted[robot.robot_id].add(lineage.episode_id)
            robot.last_upload, robot.last_version = time.time(), lineage.policy_version
        else:
            return
        self._store.put_bytes(f"{robot.robot_id}.json", json.dumps(robot.counts()).encode())

    def report(self, status: dict) -> None:
        """A robot's status report (`pacflow robot` sends one every --report-every seconds)."""
        with self._lock:
            robot = self._robot(status["robot_id"])
            robot.status, robot.last_report = dict(status), time.time()
            self._store.put_bytes(f"status/{robot.robot_id}.json", json.dumps({
                "robot_id": robot.robot_id, "status": robot.status,
                "last_report": robot.last_report}).encode())

    def progress(self, version: int) -> dict[str, dict]:
        """Per robot: episodes (their return sum and decisions) acted by `version`, total,
        last upload."""
        key = str(version)
        with self._lock:
            return self._progress(key)

    def _progress(self, key: str) -> dict[str, dict]:
        return {r.robot_id: {"episodes": r.episodes.get(key, 0),
                             "return_sum": r.returns.get(key, 0.0),
                             "steps": r.steps.get(key, 0), "total": r.total,
                             "total_steps": sum(r.steps.values()),
                             "last_upload": r.last_upload, "last_version": r.last_version,
                             "quarantined": r.quarantined, "status": dict(r.status),
                             "last_report": r.last_report}
                for r in sorted(self.robots.values(), key=lambda r: r.robot_id)}


def continue_marker(cycle: int) -> str:
    """The run storage file `pacflow fleet continue` writes for `cycle`."""
    return f"{FLEET_DIR}/continue-{cycle}"


def waiting_marker(cycle: int) -> str:
    """The run storage file that says `cycle` waits past its timeout for the operator."""
    return f"{FLEET_DIR}/waiting-{cycle}"


def progress_line(cycle: int, version: int, need: int, progress: dict[str, dict]) -> str:
    done = sum(p["episodes"] for p in progress.values())
    robots = ", ".join(f"{r} {p['episodes']} (total {p['total']})" for r, p in progress.items())
    return f"  cycle {cycle}: {done}/{need} robot episodes of v{version}" + \
        (f": {robots}" if robots else ": no robot has uploaded yet")


def wait_for_robots(fetch: Callable[[int], dict[str, dict]], run: str, cycle: int,
                    version: int, need: int, timeout_seconds: float, on_timeout: RobotTimeout,
                    out: Callable[[str], None], poll_seconds: float = 1.0) -> dict[str, dict]:
    """Blocks until `need` episodes acted by `version` are in (`fetch(version)` -> progress),
    printing a line whenever the count changes. Past `timeout_seconds` (0 = never):
    `on_timeout` "continue" returns what arrived; "wait" says so once and goes on waiting
    until enough arrive or `pacflow fleet continue` writes the cycle's marker."""
    store = Storage(run)
    try:
        return _wait(fetch, store, run, cycle, version, need, timeout_seconds, on_timeout, out,
                     poll_seconds)
    finally:  # the operator's markers count for this wait only
        for name in (waiting_marker(cycle), continue_marker(cycle)):
            if store.exists(name):
                store.fs.delete_file(store.path(name))


def _wait(fetch, store: Storage, run: str, cycle: int, version: int, need: int,
          timeout_seconds: float, on_timeout: RobotTimeout, out: Callable[[str], None],
          poll_seconds: float) -> dict[str, dict]:
    started, shown, told = time.monotonic(), "", False
    while True:
        progress = fetch(version)
        line = progress_line(cycle, version, need, progress)
        if line != shown:
            out(line)
            shown = line
        done = sum(p["episodes"] for p in progress.values())
        if done >= need:
            return progress
        late = timeout_seconds > 0 and time.monotonic() - started > timeout_seconds
        if late and on_timeout is RobotTimeout.CONTINUE:
            out(f"  cycle {cycle}: {timeout_seconds:.0f} s passed (loop.robot_timeout_seconds); "
                f"training on the {done} robot episodes that arrived")
            return progress
        if late and not told:
            store.put_bytes(waiting_marker(cycle), b"")
            out(f"  cycle {cycle}: {timeout_seconds:.0f} s passed with {done}/{need} robot "
                f"episodes of v{version} (robots pinned to another version do not count); "
                f"waiting on. `pacflow fleet continue {run}` trains on what arrived")
            told = True
        if told and store.exists(continue_marker(cycle)):
            out(f"  cycle {cycle}: the operator continued with {done} robot episodes")
            return progress
        time.sleep(poll_seconds)


CONNECTED_SECONDS = 15.0  # a robot heard from within this is connected


def fleet_table(run: str, now: float | None = None,
                fresh_seconds: float = CONNECTED_SECONDS) -> str:
    """`pacflow fleet status RUN`: per robot, from the ledger the run's policy server keeps:
    connected (a report or upload within `fresh_seconds`), when last seen, the version it acts
    with and its pin, episodes of the current version and in all, spool depth, safe idles,
    e-stop, and uploads refused by validation."""
    store, now = Storage(run), time.time() if now is None else now
    if not store.exists(FLEET_DIR):
        return f"{run}: no robot has reported to this run"
    cycle = json.loads(store.get_bytes("cycle.json"))["completed_cycles"] \
        if store.exists("cycle.json") else 0
    policies = Storage(join(run, "policies"))
    versions = [int(n[1:7]) for n in policies.list_files()
                if n.startswith("v") and n.endswith(".json")] if store.exists("policies") else []
    version = max(versions, default=0)
    pins = json.loads(policies.get_bytes("pins.json")) if policies.exists("pins.json") else {}
    lines = [f"cycle {cycle}, policy v{version}",
             f"{'robot':<16} {'connected':>9} {'last seen':>10} {'acting':>6} {'pin':>4} "
             f"{f'of v{version}':>6} {'total':>6} {'spool':>5} {'idles':>5} {'e-stop':>6} "
             f"{'refused':>7}"]
    for robot, p in FleetLedger(run).progress(version).items():
        seen = max(p["last_upload"], p["last_report"])
        status = p["status"]
        pin = (pins.get("clients") or {}).get(robot) or pins.get("fleet") or ""
        lines.append(
            f"{robot:<16} {'yes' if now - seen <= fresh_seconds else 'no':>9} "
            f"{f'{now - seen:.0f}s ago' if seen else 'never':>10} "
            f"{'v' + str(status.get('acting_version', p['last_version'])):>6} "
            f"{'v' + str(pin) if pin else '-':>4} {p['episodes']:>6} {p['total']:>6} "
            f"{status.get('spool_depth', '-'):>5} {status.get('safe_idle_entries', '-'):>5} "
            f"{'yes' if status.get('estopped') else 'no':>6} {p['quarantined']:>7}")
    return "\n".join(lines)


def continue_cycle(run: str) -> int:
    """`pacflow fleet continue RUN`: the cycle waiting past its timeout trains on the robot
    episodes that arrived. Returns the cycle; ValueError when none waits so."""
    store = Storage(run)
    cycle = json.loads(store.get_bytes("cycle.json"))["completed_cycles"] \
        if store.exists("cycle.json") else 0
    if not store.exists(waiting_marker(cycle)):
        raise ValueError(f"cycle {cycle} of {run} is not waiting for robots past "
                         "loop.robot_timeout_seconds; nothing to continue")
    store.put_bytes(continue_marker(cycle), b"")
    return cycle


class FleetCollector:
    """Prometheus collector: the ledger's per-robot figures, read at every scrape (registered
    on the run's policy server process). Counters are `_total`; a robot's own counts (safe
    idles) restart when its process restarts."""

    FIGURES = (  # (metric, type, help, value of a progress entry and the time now)
        ("pacflow_robot_connected", "gauge", "1 when the robot reported or uploaded lately",
         lambda p, now: float(now - _seen(p) <= CONNECTED_SECONDS)),
        ("pacflow_robot_last_seen_age_seconds", "gauge", "seconds since its last report or "
         "accepted upload", lambda p, now: now - _seen(p) if _seen(p) else None),
        ("pacflow_robot_episodes", "counter", "episodes accepted from the robot, all versions",
         lambda p, now: p["total"]),
        ("pacflow_robot_uploads_refused", "counter", "uploads that failed validation",
         lambda p, now: p["quarantined"]),
        ("pacflow_robot_acting_version", "gauge", "policy version the robot acts with",
         lambda p, now: p["status"].get("acting_version")),
        ("pacflow_robot_spool_depth", "gauge", "episodes waiting in the robot's spool",
         lambda p, now: p["status"].get("spool_depth")),
        ("pacflow_robot_safe_idle_entries", "counter", "watchdog trips since the robot "
         "process started", lambda p, now: p["status"].get("safe_idle_entries")),
        ("pacflow_robot_estopped", "gauge", "1 when the robot reported an e-stop",
         lambda p, now: int(bool(p["status"].get("estopped"))) if p["status"] else None),
    )

    def __init__(self, ledger: FleetLedger):
        self._ledger = ledger

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        progress, now = self._ledger.progress(0), time.time()
        for name, kind, text, value in self.FIGURES:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=["robot"])
            for robot, p in progress.items():
                v = value(p, now)
                if v is not None:
                    family.add_metric([robot], float(v))
            yield family


def _seen(p: dict) -> float:
    return max(p["last_upload"], p["last_report"])
