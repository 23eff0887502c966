"""Collect-and-infer on a robot fleet, run the way an operator runs it: `pacflow policy
gen-certs`, `pacflow run --config deploy/configs/robot_fleet.yaml` (no sim actors) and two
`pacflow robot --spec deploy/robots/cartpole.yaml` processes, each with its own credentials
over mutual TLS. Three cycles; one robot is SIGKILLed with episodes in its spool (at an
upload count drawn from a seeded RNG) and restarted on the same spool."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from replay.archive import EpisodeArchive
from tests.processes import until

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cluster.cli"]
ROBOTS = ("robot-1", "robot-2")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uploaded(run: Path, robot: str) -> int:
    ledger = run / "fleet" / f"{robot}.json"
    return sum(json.loads(ledger.read_text())["episodes"].values()) if ledger.exists() else 0


def _status(run: Path, robot: str) -> dict:
    """A robot's last status report, as the run's ledger holds it."""
    ledger = run / "fleet" / "status" / f"{robot}.json"
    return json.loads(ledger.read_text())["status"] if ledger.exists() else {}


def _fleet_status(run: Path) -> str:
    status = subprocess.run([*CLI, "fleet", "status", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    return status.stdout


def _scrape(run: Path) -> str:
    """The run's policy server's Prometheus endpoint (its file_sd target)."""
    (target,) = json.loads((run / "metrics" / "targets" / "policyserver.json").read_text())
    with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=30) as r:
        return r.read().decode()


def _spooled(spool: Path) -> set[str]:
    return {p.name[:-len(".parquet")] for p in spool.glob("*.parquet")}


@pytest.mark.timeout(900)
def test_two_robots_three_cycles_one_killed_and_restarted(tmp_path):
    creds, run, port = tmp_path / "creds", tmp_path / "run", _free_port()
    subprocess.run([*CLI, "policy", "gen-certs", str(creds), *(a for r in ROBOTS
                                                               for a in ("--robot", r))],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    home = tmp_path / "home"
    home.mkdir()
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen(
        [*CLI, "run", "--config", "deploy/configs/robot_fleet.yaml", "--run-dir", str(run),
         "--set", f"cluster.policy_port={port}", "--set",
         f"cluster.policy_credentials={creds}"],
        cwd=ROOT, env={**os.environ, "HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "PACFLOW_STANDIN_TIME_LIMIT": "1.0"}  # 13 decisions per episode

    logs: dict[str, Path] = {}  # robot id -> its latest process's log

    def robot(robot_id: str, tag: str) -> subprocess.Popen:
        logs[robot_id] = tmp_path / f"robot-{tag}.log"
        # a file, not a pipe nobody reads while it runs (a full pipe would block its logging)
        with open(logs[robot_id], "w") as stderr:
            return subprocess.Popen(
                [*CLI, "robot", "--gateway", f"127.0.0.1:{port}", "--env",
                 "actors.standins:cartpole", "--spec", "deploy/robots/cartpole.yaml",
                 "--robot-id", robot_id, "--credentials", str(creds), "--spool",
                 str(tmp_path / f"spool-{robot_id}"), "--control-period", "0.02",
                 "--staleness-budget", "5", "--upload-retry", "0.2", "--drain-seconds", "0",
                 "--report-every", "0.5",
                 "--stats", str(tmp_path / f"stats-{tag}.json")],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    robots = {r: robot(r, r) for r in ROBOTS}
    spool2 = tmp_path / "spool-robot-2"
    try:
        # robot-2 dies after a drawn number of accepted uploads, with episodes still spooled:
        # stopped (SIGSTOP) until its spool holds one, then SIGKILLed.
        kill_after = random.Random(20261203).randrange(2, 12)
        until(lambda: driver.poll() is None and _uploaded(run, "robot-2") >= kill_after,
              f"{kill_after} uploads of robot-2", timeout=300)
        victim = robots["robot-2"]
        while True:
            victim.send_signal(signal.SIGSTOP)
            if _spooled(spool2):
                break
            victim.send_signal(signal.SIGCONT)
            until(lambda: _spooled(spool2), "an episode in robot-2's spool", timeout=60,
                  poll=0.005)
        victim.kill()
        victim.wait()
        pending = _spooled(spool2)  # finished, never acknowledged: must arrive once
        robots["robot-2"] = robot("robot-2", "robot-2-restarted")
        # While the run goes on: the operator's view and the metrics show both robots.
        until(lambda: driver.poll() is not None or all(
            _status(run, r).get("episodes", 0) >= 1 for r in ROBOTS), "reports of both robots",
            timeout=120)
        assert driver.poll() is None, "the run ended before the operator's view was read"
        view, metrics = _fleet_status(run), _scrape(run)
        assert driver.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        for proc in robots.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*robots.values(), driver]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    output = (tmp_path / "run.log").read_text()
    for robot_id, proc in robots.items():
        assert proc.returncode == 0, logs[robot_id].read_text()[-3000:]

    archived = {e.lineage.episode_id: e for e in EpisodeArchive(run / "archive").episodes()}
    lineages = [e.lineage for e in archived.values()]
    # Every robot episode is archived once, with the lineage of the version that acted it.
    assert {lin.actor_id for lin in lineages} == set(ROBOTS)
    assert pending and pending <= set(archived)  # the killed robot's spool arrived
    for ep in archived.values():
        lin = ep.lineage
        assert lin.task == "robot:cartpole-standin" and lin.mode == "collect"
        # Policies switch only between episodes: one version acts every step of an episode.
        assert set(ep.policy_version[:-1].tolist()) == {lin.policy_version}
        assert lin.cycle == lin.policy_version - 1  # v1 is published for cycle 0, v2 for 1...
    assert len({lin.seed for lin in lineages}) > len(lineages) // 2
    # Versions advance: each cycle had its 6 episodes acted by its own version.
    counts = np.bincount([lin.policy_version for lin in lineages])
    assert all(counts[v] >= 6 for v in (1, 2, 3)), counts
    state = json.loads((run / "cycle.json").read_text())
    assert state["completed_cycles"] == 3 and state["policy_version"] == 4
    last = state["rows"][-1]  # every robot episode accepted by then, and its decisions
    assert 18 <= last["episodes"] <= len(lineages)
    assert last["env_steps"] <= sum(e.length for e in archived.values())
    assert last["env_steps"] >= last["episodes"] * min(e.length for e in archived.values())
    # Each cycle c waited for 6 episodes acted by its own version, v(c+1), before its row.
    for cycle in range(3):
        done = re.findall(rf"^  cycle {cycle}: (\d+)/6 robot episodes of v{cycle + 1}:",
                          output, re.MULTILINE)
        assert done and int(done[-1]) >= 6, output
        waited = output.index(f"  cycle {cycle}: {done[-1]}/6")
        assert waited < output.index(f"\n    {cycle}  "), output
    # Each robot's every recorded episode is archived or still in its spool, and the ledger
    # counted each archived one once.
    for robot_id in ROBOTS:
        stats = [json.loads(p.read_text()) for p in tmp_path.glob(f"stats-{robot_id}*.json")]
        recorded = {i for s in stats for i in s["episode_ids"]}
        spool = _spooled(tmp_path / f"spool-{robot_id}")
        assert recorded <= set(archived) | spool
        # The run's end can cut one upload per robot (each sends one at a time) between the
        # archive and the ledger; a live run counts it when the robot retries.
        archived_by_robot = sum(lin.actor_id == robot_id for lin in lineages)
        assert 0 <= archived_by_robot - _uploaded(run, robot_id) <= 1
    # The operator's view during the run: both connected, acting with a version, their counts.
    for robot_id in ROBOTS:
        (name, connected, seen, _, acting, pin, _, total, spool, idles, estop, refused) = next(
            x for x in view.splitlines() if x.startswith(robot_id)).split()
        assert (connected, pin, estop, refused) == ("yes", "-", "no", "0"), view
        assert acting.startswith("v") and int(acting[1:]) >= 1 and int(total) >= 1, view
        assert spool.isdigit() and idles.isdigit(), view
    for robot_id in ROBOTS:  # the run's policy server's metrics, read while it ran
        assert f'pacflow_robot_episodes_total{{robot="{robot_id}"}}' in metrics
        assert f'pacflow_robot_spool_depth{{robot="{robot_id}"}}' in metrics
        assert f'pacflow_robot_estopped{{robot="{robot_id}"}} 0.0' in metrics
    final = _fleet_status(run)
    for robot_id in ROBOTS:
        line = next(x for x in final.splitlines() if x.startswith(robot_id)).split()
        assert int(line[7]) == _uploaded(run, robot_id), final
