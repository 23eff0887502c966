"""`pacflow robot` against `pacflow policy serve`, both as processes the way an operator starts
them, over mutual TLS with tokens: the gateway is killed (SIGKILL) and restarted under the robot,
and no episode is lost or duplicated; the control loop never takes longer than one period; an
e-stop signal stops the robot at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from policies.client import publish
from policies.perceiver import PerceiverActorCritic
from policies.security import ClientSecurity
from policies.snapshot import Snapshot, snapshot_metadata
from replay.archive import EpisodeArchive

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cluster.cli"]
PERIOD = 0.1  # the robot's control period, seconds; episodes are 1 s of simulated time
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture()
def fleet(tmp_path):
    """Credentials, a gateway process (restartable on its port) and a published policy."""
    creds, gateway_dir, port = tmp_path / "creds", tmp_path / "gateway", _free_port()
    subprocess.run([*CLI, "policy", "gen-certs", str(creds), "--robot", "robot-1"], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    procs = []

    def start_gateway() -> subprocess.Popen:
        proc = subprocess.Popen(
            [*CLI, "policy", "serve", str(gateway_dir), "--config", "deploy/configs/smoke.yaml",
             "--credentials", str(creds), "--port", str(port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        assert "listening on" in proc.stdout.readline()
        return proc

    gateway = start_gateway()
    config = load_config(ROOT / "deploy/configs/smoke.yaml")
    spec = config.env.spec()
    torch.manual_seed(0)
    model = PerceiverActorCritic(spec, config.model)
    snapshot = Snapshot.from_state_dict(1, model.state_dict(), snapshot_metadata(
        spec.to_dict(), config.model, 0, 0, 0))
    publish(f"127.0.0.1:{port}", snapshot, timeout=30,
            security=ClientSecurity.from_dir(creds, "learner"))
    state = {"gateway": gateway, "start": start_gateway, "port": port, "creds": creds,
             "archive": gateway_dir / "archive"}
    yield state
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _start_robot(fleet, tmp_path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PACFLOW_STANDIN_TIME_LIMIT": "1.0"}
    return subprocess.Popen(
        [*CLI, "robot", "--gateway", f"127.0.0.1:{fleet['port']}", "--env",
         "actors.standins:cartpole", "--robot-id", "robot-1", "--credentials",
         str(fleet["creds"]), "--spool", str(tmp_path / "spool"), "--control-period",
         str(PERIOD), "--staleness-budget", "0.5", "--upload-retry", "0.2",
         "--stats", str(tmp_path / "stats.json"), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _archived(fleet) -> list:
    if not Path(fleet["archive"]).exists():
        return []
    return [e.lineage for e in EpisodeArchive(fleet["archive"]).episodes()]


def test_gateway_killed_and_restarted_under_the_robot_loses_nothing(fleet, tmp_path):
    robot = _start_robot(fleet, tmp_path, "--max-episodes", "8")
    _wait(lambda: len(_archived(fleet)) >= 2, 120, "two uploaded episodes")
    fleet["gateway"].kill()  # SIGKILL: no graceful shutdown
    fleet["gateway"].wait()
    time.sleep(2.0)  # the robot is cut off for four staleness budgets
    fleet["gateway"] = fleet["start"]()
    _, stderr = robot.communicate(timeout=180)
    assert robot.returncode == 0, stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    archived = _archived(fleet)
    ids = [lin.episode_id for lin in archived]
    assert stats["episodes"] == stats["uploaded"] == 8
    assert sorted(ids) == sorted(stats["episode_ids"]) and len(set(ids)) == 8
    assert {lin.actor_id for lin in archived} == {"robot-1"}
    assert stats["safe_idle_entries"] >= 1 and "safe idle" in stderr
    assert stats["max_compute_seconds"] < PERIOD  # inference + step never waited on the network
    assert not list((tmp_path / "spool").glob("*.parquet"))


def test_estop_signal_stops_the_robot_at_once(fleet, tmp_path):
    robot = _start_robot(fleet, tmp_path)
    _wait(lambda: len(_archived(fleet)) >= 1, 120, "one uploaded episode")
    t0 = time.monotonic()
    robot.send_signal(signal.SIGUSR1)
    robot.communicate(timeout=30)
    assert time.monotonic() - t0 < 5.0  # interpreter exit included; the loop stops within a period
    assert robot.returncode == 3
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["estopped"]
    kept = stats["uploaded"] + len(list((tmp_path / "spool").glob("*.parquet")))
    assert kept == stats["episodes"]  # the interrupted episode was spooled, not dropped


def test_bad_env_factory_and_plaintext_to_a_remote_gateway_exit_2(tmp_path):
    bad_env = subprocess.run([*CLI, "robot", "--gateway", "127.0.0.1:1", "--env", "nosuch:make"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_env.returncode == 2 and "--env" in bad_env.stderr
    assert len(bad_env.stderr.strip().splitlines()) == 1
    remote = subprocess.run([*CLI, "robot", "--gateway", "gateway.invalid:50051", "--env",
                             "actors.standins:cartpole"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert remote.returncode == 2 and "plaintext is only for loopback" in remote.stderr


def test_operator_commands_publish_list_and_pin_with_their_roles(fleet, tmp_path):
    address, creds = f"127.0.0.1:{fleet['port']}", str(fleet["creds"])
    stored = Path(fleet["archive"]).parent / "policies" / "v000001.json"

    def pacflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "policy", *args, "--credentials", creds], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    published = pacflow("publish", address, "--snapshot", str(stored), "--as-version", "2")
    assert published.returncode == 0 and "published v2" in published.stdout
    listed = pacflow("ls", address)
    assert [line.split()[0] for line in listed.stdout.splitlines()[:2]] == ["v1", "v2"]
    pinned = pacflow("pin", address, "--version", "1", "--client", "robot-1")
    assert pinned.returncode == 0 and "'robot-1': 1" in pinned.stdout
    as_robot = pacflow("unpin", address, "--client", "robot-1", "--identity", "robot-1")
    assert as_robot.returncode == 2 and "PERMISSION_DENIED" in as_robot.stderr
