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
import time
from typing import Callable

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
        self.robots: dict[str, RobotRecord] = {}
        if self._store.exists():
            for name in self._store.list_files():
                if name.endswith(".json"):
                    record = RobotRecord(**json.loads(self._store.get_bytes(name)))
                    self.robots[record.robot_id] = record

    def record(self, episode: Episode, result: Ingested) -> None:
        lineage = episode.lineage
        robot = self.robots.setdefault(lineage.actor_id, RobotRecord(lineage.actor_id))
        if result.problems:
            robot.quarantined += 1
        elif lineage.episode_id not in robot.counted:  # stored now, or by a write cut short
            version = str(lineage.policy_version)
            robot.episodes[version] = robot.episodes.get(version, 0) + 1
            robot.returns[version] = robot.returns.get(version, 0.0) + episode.episode_return
            robot.steps[version] = robot.steps.get(version, 0) + episode.length
            robot.counted.append(lineage.episode_id)
            robot.last_upload, robot.last_version = time.time(), lineage.policy_version
        else:
            return
        self._store.put_bytes(f"{robot.robot_id}.json",
                              json.dumps(dataclasses.asdict(robot)).encode())

    def progress(self, version: int) -> dict[str, dict]:
        """Per robot: episodes (their return sum and decisions) acted by `version`, total,
        last upload."""
        key = str(version)
        return {r.robot_id: {"episodes": r.episodes.get(key, 0),
                             "return_sum": r.returns.get(key, 0.0),
                             "steps": r.steps.get(key, 0), "total": r.total,
                             "total_steps": sum(r.steps.values()),
                             "last_upload": r.last_upload, "last_version": r.last_version,
                             "quarantined": r.quarantined}
                for r in sorted(self.robots.values(), key=lambda r: r.robot_id)}


def continue_marker(cycle: int) -> str:
    """The run storage file `pacflow fleet continue` writes for `cycle`."""
    return f"{FLEET_DIR}/continue-{cycle}"


def progress_line(cycle: int, version: int, need: int, progress: dict[str, dict]) -> str:
    done = sum(p["episodes"] for p in progress.values())
    robots = ", ".join(f"{r} {p['episodes']} (total {p['total']})" for r, p in progress.items())
    return f"  cycle {cycle}: {done}/{need} robot episodes of v{version}" + \
        (f": {robots}" if robots else ": no robot has uploaded yet")


def wait_for_robots(fetch: Callable[[int], dict[str, dict]], run: str, cycle: int,
                    version: int, need: int, timeout_seconds: float, on_timeout: str,
                    out: Callable[[str], None], poll_seconds: float = 1.0) -> dict[str, dict]:
    """Blocks until `need` episodes acted by `version` are in (`fetch(version)` -> progress),
    printing a line whenever the count changes. Past `timeout_seconds` (0 = never):
    `on_timeout` "continue" returns what arrived; "wait" says so once and goes on waiting
    until enough arrive or `pacflow fleet continue` writes the cycle's marker."""
    store, started, shown, told = Storage(run), time.monotonic(), "", False
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
        if late and on_timeout == "continue":
            out(f"  cycle {cycle}: {timeout_seconds:.0f} s passed (loop.robot_timeout_seconds); "
                f"training on the {done} robot episodes that arrived")
            return progress
        if late and not told:
            out(f"  cycle {cycle}: {timeout_seconds:.0f} s passed with {done}/{need} robot "
                f"episodes; waiting on. `pacflow fleet continue {run}` trains on what arrived")
            told = True
        if store.exists(continue_marker(cycle)):
            out(f"  cycle {cycle}: the operator continued with {done} robot episodes")
            return progress
        time.sleep(poll_seconds)


def fleet_table(run: str, now: float | None = None) -> str:
    """`pacflow fleet status RUN`: per robot, its uploads to the run as the ledger holds them."""
    store, now = Storage(run), time.time() if now is None else now
    if not store.exists(FLEET_DIR):
        return f"{run}: no robot has uploaded to this run"
    cycle = json.loads(store.get_bytes("cycle.json"))["completed_cycles"] \
        if store.exists("cycle.json") else 0
    versions = [int(n[1:7]) for n in Storage(join(run, "policies")).list_files()
                if n.startswith("v") and n.endswith(".json")] \
        if store.exists("policies") else []
    version = max(versions, default=0)
    progress = FleetLedger(run).progress(version)
    lines = [f"cycle {cycle}, policy v{version}",
             f"{'robot':<20} {'last upload':>12} {'acting':>7} {f'of v{version}':>7} "
             f"{'total':>6} {'refused':>8}"]
    for robot, p in progress.items():
        age = f"{now - p['last_upload']:.0f} s ago" if p["last_upload"] else "never"
        lines.append(f"{robot:<20} {age:>12} {'v' + str(p['last_version']):>7} "
                     f"{p['episodes']:>7} {p['total']:>6} {p['quarantined']:>8}")
    return "\n".join(lines)


def continue_cycle(run: str) -> int:
    """`pacflow fleet continue RUN`: the waiting cycle trains on the robot episodes that
    arrived. Returns the cycle."""
    store = Storage(run)
    cycle = json.loads(store.get_bytes("cycle.json"))["completed_cycles"] \
        if store.exists("cycle.json") else 0
    store.put_bytes(continue_marker(cycle), b"")
    return cycle
