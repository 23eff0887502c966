"""The collect phase's wait for robot episodes (cluster/robots.py) on its own: counts per
version, the timeout's two answers, and the operator's `pacflow fleet continue`; the ledger
counts an episode once, across a restart of the process that keeps it."""

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

from cluster.config import RobotTimeout
from cluster.robots import FleetLedger, wait_for_robots
from replay.ingest import Ingested
from tests.fakes import make_episode

ROOT = Path(__file__).resolve().parents[2]


def _progress(counts: dict[str, int]) -> dict[str, dict]:
    return {r: {"episodes": n, "total": n} for r, n in counts.items()}


def test_waits_for_the_versions_episodes_and_prints_each_change(tmp_path):
    arrivals = iter([{}, {"robot-1": 1}, {"robot-1": 1}, {"robot-1": 2, "robot-2": 1}])
    lines: list[str] = []
    got = wait_for_robots(lambda v: _progress(next(arrivals)), str(tmp_path), 4, 5, 3, 0.0,
                          RobotTimeout.WAIT, lines.append, poll_seconds=0.0)
    assert sum(p["episodes"] for p in got.values()) == 3
    assert lines == ["  cycle 4: 0/3 robot episodes of v5: no robot has uploaded yet",
                     "  cycle 4: 1/3 robot episodes of v5: robot-1 1 (total 1)",
                     "  cycle 4: 3/3 robot episodes of v5: robot-1 2 (total 2), robot-2 1 "
                     "(total 1)"]


def test_past_the_timeout_it_continues_or_waits_for_the_operator(tmp_path):
    lines: list[str] = []
    got = wait_for_robots(lambda v: _progress({"robot-1": 1}), str(tmp_path), 0, 1, 3, 0.05,
                          RobotTimeout.CONTINUE, lines.append, poll_seconds=0.01)
    assert got["robot-1"]["episodes"] == 1
    assert lines[-1].endswith("training on the 1 robot episodes that arrived")

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    (run / "cycle.json").write_text(json.dumps({"completed_cycles": 2, "rows": []}))
    early = _fleet_continue(run)  # nothing waits yet: refused, and no marker is left behind
    assert early.returncode == 2 and "cycle 2 of" in early.stderr
    assert "is not waiting for robots" in early.stderr
    told = threading.Event()
    lines = []

    def out(line: str) -> None:
        lines.append(line)
        if "waiting on" in line:
            told.set()

    waiter = threading.Thread(target=wait_for_robots, args=(
        lambda v: _progress({"robot-1": 1}), str(run), 2, 3, 3, 0.05, RobotTimeout.WAIT, out, 0.01))
    waiter.start()
    assert told.wait(timeout=30)
    assert waiter.is_alive()  # it waits on past the timeout
    done = _fleet_continue(run)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cycle 2 continues with the robot episodes that arrived"
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert lines[-1] == "  cycle 2: the operator continued with 1 robot episodes"
    assert sum("waiting on" in line for line in lines) == 1
    assert not list((run / "fleet").iterdir())  # the markers went with the wait


def _fleet_continue(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "fleet", "continue", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_ledger_counts_each_episode_once_across_restarts(tmp_path):
    episode = make_episode(length=7)
    ledger = FleetLedger(str(tmp_path))
    ledger.record(episode, Ingested(True, False))
    ledger.record(episode, Ingested(False, True))  # a retried upload: a duplicate
    again = FleetLedger(str(tmp_path))  # the policy server restarted
    again.record(episode, Ingested(False, True))
    again.record(make_episode(length=5), Ingested(False, False, ("reward: non-finite",)))
    robot = episode.lineage.actor_id
    version = episode.lineage.policy_version
    progress = again.progress(version)[robot]
    assert (progress["episodes"], progress["total"], progress["steps"]) == (1, 1, 7)
    assert progress["quarantined"] == 1
    newer = dataclasses.replace(make_episode(length=4), lineage=dataclasses.replace(
        make_episode().lineage, actor_id=robot, policy_version=version + 1))
    again.record(newer, Ingested(True, False))
    # Episodes of another version count toward the total, not toward this version's cycle.
    assert (again.progress(version)[robot]["episodes"], again.progress(version)[robot]["total"],
            again.progress(version + 1)[robot]["episodes"]) == (1, 2, 1)


def test_fleet_commands_name_a_folder_that_holds_no_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "fleet", "status",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"pacflow: error: fleet: {tmp_path} holds no run (no " \
                                  "config.yaml)"


def test_a_resume_refuses_a_robot_spec_that_changed(tmp_path):
    import pytest
    import yaml

    from cluster.config import load_config
    from cluster.preflight import RunDirError, check_run_dir, prepare_run_dir

    spec = tmp_path / "arm.yaml"
    data = yaml.safe_load((ROOT / "deploy/robots/cartpole.yaml").read_text())
    spec.write_text(yaml.safe_dump(data))
    config = load_config(ROOT / "deploy/configs/robot_fleet.yaml", [f"env.tasks=[robot:{spec}]"])
    run = str(tmp_path / "run")
    prepare_run_dir(config, run, resume=False)
    check_run_dir(config, run, resume=True)  # unchanged: fine
    spec.write_text(yaml.safe_dump({**data, "observations": {"position": [3], "velocity": [3]}}))
    with pytest.raises(RunDirError, match="env.tasks describe other tasks than when the run "
                                          "started"):
        check_run_dir(config, run, resume=True)
