"""Reliability scenarios that need a Ray cluster (`../shared/notes/reliability.md` §6, S18 and
S19), with real processes killed at steps drawn from a seeded RNG."""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from replay.archive import EpisodeArchive
from tests.processes import ray_pids, until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # `ray` of this environment
MiB = 1 << 20
pytestmark = pytest.mark.slow


def _mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (a Ray node's temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _completed(run: Path) -> int:
    state = run / "cycle.json"
    return json.loads(state.read_text())["completed_cycles"] if state.exists() else 0


@pytest.mark.timeout(420)
def test_s18_a_collector_past_its_restarts_stops_the_run(tmp_path):
    """`cluster.max_restarts: 1` and the one collector SIGKILLed twice inside collect calls (the
    cycle drawn from a seeded RNG): the run does not go on with fewer actors. It stops within
    seconds with one line naming the process and the setting, and what it archived is whole."""
    run, home = tmp_path / "run", tmp_path / "home"  # HOME tells this run's Ray workers apart
    home.mkdir()
    cycle = random.Random(20261202).randrange(0, 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run), "--set", "cluster.num_actors=1", "--set",
         "cluster.max_restarts=1", "--set", "loop.num_cycles=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "HOME": str(home)})
    try:
        def collecting(exclude: set[int]) -> list[int]:
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {proc.stderr.read()[-3000:]}")
            if _completed(run) < cycle:
                return []
            return sorted(set(ray_pids("ray::CollectorWorker.collect", str(home))) - exclude)

        killed: set[int] = set()
        for _ in range(2):  # the first death is restarted and the call retried; the second not
            (pid,) = until(lambda: collecting(killed), "a collect call")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
        stopped_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pacflow run: actor-0: died during collect and could not be "
                           "restarted (cluster.max_restarts)"), last
    assert "continue with --resume" in last
    print(f"stopped {stopped_after:.1f} s after the second kill")
    assert stopped_after < 10, stopped_after
    assert cycle <= _completed(run) <= cycle + 1 < 3  # no cycle after the second death
    good, bad = EpisodeArchive(run / "archive").verify()
    assert bad == [] and good >= 4 * _completed(run)
    # The run's Ray instance went with it: no worker, raylet or GCS of it is left behind.
    until(lambda: not ray_pids("", str(home)), "the run's Ray processes to exit", 60)


def _wait_for_head(head: subprocess.Popen, port: int, env: dict, log: Path, temp: Path):
    """Waits until `ray status` answers at `port`; fails at once if `ray start` exited, and with
    the tails of its output and of the node's GCS and raylet logs if it never answered."""
    def up() -> bool:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}: {log.read_text()[-3000:]}")
        try:
            return subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"],
                                  env=env, capture_output=True, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False
    try:
        until(up, "the head node", timeout=240, poll=1.0)
    except pytest.fail.Exception:
        tails = [f"{path}: {path.read_text(errors='replace')[-1500:]}"
                 for path in sorted(temp.glob("session_latest/logs/*"))
                 if path.name.startswith(("gcs_server", "raylet")) and path.is_file()]
        pytest.fail("\n".join(["the head node never answered `ray status`",
                               f"ray start: {log.read_text()[-2000:]}", *tails]))


@pytest.mark.timeout(600)
def test_s19_episodes_under_object_store_pressure(tmp_path):
    """A head node with a 100 MiB object store (`ray start --object-store-memory`) and 8 camera
    episodes of about 30 MiB each, put at once and sent to the run's replay process: Ray spills
    them to disk and restores them; replay holds every item, the objects come back intact, the
    sampled frames are the episodes', and no node died."""
    home, temp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="pfs"))  # short socket paths
    home.mkdir()
    # Token authentication, Ray's default, set explicitly: an earlier ray.init in this process
    # turns it on in os.environ, and `ray start` then needs a token in the new HOME.
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ray-start.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", "2", "--object-store-memory", str(100 * MiB), "--include-dashboard",
             "false", "--temp-dir", str(temp), "--block"], env=env, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT)
    steps = 30 * MiB // (240 * 320 * 3)
    try:
        _wait_for_head(head, port, env, log, temp)
        pusher = subprocess.run(
            [sys.executable, "-m", "tests.reliability.children", "episode-pusher",
             f"127.0.0.1:{port}", str(tmp_path / "run"), "8", str(steps)],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=480)
        assert pusher.returncode == 0, pusher.stderr[-3000:]
        result = json.loads(pusher.stdout.strip().splitlines()[-1])
        assert head.poll() is None, "the head node died"
    finally:  # SIGKILL, not `ray stop`'s 30 s of graceful shutdown: nothing here is kept
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        until(lambda: not _mentioning(str(temp)), "the head node's processes to exit", 60)
        shutil.rmtree(temp, ignore_errors=True)
    assert result["written"] == [steps] * 8 and result["items"] == 8 * steps
    assert result["intact"] and result["sampled_known"]
    assert result["nodes_alive"] == [True]
    spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", result["memory"])
    print(spilled[0] if spilled else result["memory"])
    assert spilled and int(spilled[1]) > 0, result["memory"]
