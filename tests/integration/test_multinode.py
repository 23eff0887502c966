"""A real two-node Ray cluster on loopback, driven the way the README tells users to:

    ray get-auth-token --generate; export RAY_AUTH_MODE=token
    ray start --head ... --resources '{"head": 1}'
    ray start --address ... --resources '{"worker": 1}'
    ray job submit --working-dir . -- pacflow run ... --run-dir s3://...

with run storage on moto's S3 server. During the run a collector's and the learner's worker
processes are SIGKILLed (the cycles drawn from a seeded RNG), and the worker node's policy relay
once every process is up. The run must still finish with
every collected episode archived exactly once, versions advancing, and everything a user needs
in S3; then the nodes' scratch is deleted and the run resumes from S3 alone."""

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
from pathlib import Path

import pytest

from actors.loop import episode_identity
from cluster.config import load_config
from cluster.topology import split
from replay.archive import EpisodeArchive
from replay.storage import Storage, run_id, scratch_dir
from tests.conftest import s3_environment
from tests.processes import ray_pids, until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
SETS = ["--set", "cluster.server_resource=head", "--set", "cluster.actor_resource=worker",
        "--set", "cluster.host=auto", "--set", "loop.num_cycles=3",
        "--set", "loop.learner_steps_per_cycle=200",
        # each collector steps one of its 2 envs, a child process the other (actors/env_group.py)
        "--set", "cluster.env_processes=1"]


def _env_processes(pid: int) -> list[int]:
    """The env-stepping children (actors/env_group.py) of process `pid`."""
    import psutil

    return [c.pid for c in psutil.Process(pid).children()
            if "actors.env_group" in " ".join(c.cmdline())]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(env: dict, gcs: str, resources: str) -> subprocess.Popen:
    """Another node on loopback (`ray start --address`), its processes one process group."""
    return subprocess.Popen(
        ["ray", "start", "--address", gcs, "--resources", resources, "--node-ip-address",
         "127.0.0.1", "--num-cpus", "2", "--dashboard-agent-listen-port", str(_free_port()),
         "--block"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL to a node's process group (start_new_session): all its processes at once
    (SIGTERM to `ray start --block` takes 30 s per node to stop it)."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:  # the node had already stopped
        pass
    node.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(endpoint):
    """(environment of the user's shell, dashboard address, GCS address) of a head node and a
    worker node started with `ray start` on 127.0.0.1, token authentication on."""
    home = Path(tempfile.mkdtemp(prefix="pfh"))  # a fresh ~/.ray/auth_token
    temp = Path(tempfile.mkdtemp(prefix="pfr"))  # short: Ray's socket paths must fit
    env = {**os.environ, **s3_environment(endpoint), "HOME": str(home),
           "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    port, dashboard = _free_port(), _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--block"]
    agent = ["--dashboard-agent-listen-port"]  # default 52365: one per node, so one per machine
    nodes = [subprocess.Popen(
        ["ray", "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard),
         "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp),
         "--resources", '{"head": 1}', *agent, str(_free_port()), *common],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)]  # its logs are in the temp dir's session_latest/logs
    try:
        until(lambda: subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"],
                                      env=env, capture_output=True).returncode == 0,
               "the head node", timeout=120, poll=1.0)
        nodes.append(_join(env, f"127.0.0.1:{port}", '{"worker": 1}'))
        until(lambda: _active_nodes(env, port) == 2, "2 active nodes in `ray status`",
               timeout=120, poll=1.0)
        # The head's job agent comes up after the node; until then a submit gets "No available
        # agent to submit job, please try again later".
        until(lambda: subprocess.run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", "true"],
            env=env, capture_output=True).returncode == 0, "the job agent", timeout=180,
            poll=2.0)
        # The servers advertise their node's IP (cluster.host=auto), which is not loopback
        # (Ray resolves 127.0.0.1 to the machine's address), so the policy server runs mTLS.
        import ray.util

        creds = temp / "creds"
        subprocess.run(["pacflow", "policy", "gen-certs", str(creds), "--host",
                        ray.util.get_node_ip_address()], env=env, check=True,
                       capture_output=True, timeout=120)
        yield env, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", creds
    finally:
        for node in reversed(nodes):
            _kill_node(node)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def _active_nodes(env: dict, port: int) -> int:
    """Nodes listed under "Active:" by `ray status`."""
    out = subprocess.run(["ray", "status", "--address", f"127.0.0.1:{port}"], env=env,
                         capture_output=True, text=True).stdout
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"node_[0-9a-f]+", active))


def _targets(run: str, env: dict, tmp_path: Path) -> dict[str, dict]:
    """{process: file_sd entry} of the run, through `pacflow metrics targets` on its S3
    storage."""
    out = tmp_path / "targets.json"
    subprocess.run(["pacflow", "metrics", "targets", run, "--out", str(out)], env=env,
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return {e["labels"]["instance_name"]: e for e in json.loads(out.read_text())}


def _scrape_all(run: str, env: dict, tmp_path: Path) -> tuple[dict, dict] | None:
    """({process: file_sd entry}, {process: its /metrics text}) through `pacflow metrics targets`
    on the run's S3 storage, once every process of the run is listed; None before."""
    entries = _targets(run, env, tmp_path)
    if not {"driver", "replay", "policyserver", "learner", "actor-0", "actor-1"} <= set(entries) \
            or not any(name.startswith("relay-") for name in entries):
        return None
    return entries, {name: _metrics(entry) for name, entry in entries.items()}


def _metrics(entry: dict) -> str:
    """The /metrics text of a file_sd entry's endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://{entry['targets'][0]}/metrics", timeout=10) as r:
        return r.read().decode()


def _completed(run: str) -> int:
    store = Storage(run)
    return json.loads(store.get_bytes("cycle.json"))["completed_cycles"] \
        if store.exists("cycle.json") else 0


def test_job_survives_killed_collector_and_learner_and_keeps_everything_in_s3(
        cluster, s3_prefix, tmp_path):
    env, dashboard, gcs, creds = cluster
    sets = [*SETS, "--set", f"cluster.policy_credentials={creds}"]
    run = f"{s3_prefix[0]}/run"  # this process reaches the bucket the way the cluster does
    rng = random.Random(20261202)
    kill_collector_in, kill_learner_in = rng.randrange(0, 3), rng.randrange(1, 3)

    # A plain local path on a 2-node cluster is refused before anything starts.
    local = subprocess.run(["pacflow", "run", "--config", "deploy/configs/smoke.yaml",
                            "--address", gcs, "--run-dir", "/tmp/pacflow-not-shared", *sets],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert local.returncode == 2 and "2 nodes" in local.stderr, local.stderr[-2000:]
    assert len(local.stderr.strip().splitlines()) == 1

    log_path = tmp_path / "submit.log"
    log = open(log_path, "w")
    submit = subprocess.Popen(
        ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
         "pacflow", "run", "--config", "deploy/configs/smoke.yaml", "--address", "auto",
         "--run-dir", run, *sets], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    killed = {}
    try:
        for target, cycle, title in sorted(
                [("collector", kill_collector_in, "ray::CollectorWorker.collect"),
                 ("learner", kill_learner_in, "ray::LearnerWorker.train")],
                key=lambda t: t[1]):
            def running(condition):
                if submit.poll() is not None:  # the job ended before the kill: say why
                    pytest.fail(f"job ended early: {log_path.read_text()[-4000:]}")
                return condition()

            until(lambda: running(lambda: _completed(run) >= cycle), f"cycle {cycle} to start")
            if not killed:  # before any kill: every process's metrics, found through S3
                entries, scraped = until(lambda: running(lambda: _scrape_all(run, env, tmp_path)),
                                "every process's metrics endpoint in the run's targets")
                # The worker node's relay took each version once for both collectors, which
                # read its files: the policy server's one subscriber is the relay (both connect
                # on threads of their own, so poll until they have).
                (relay,) = [name for name in entries if name.startswith("relay-")]
                until(lambda: running(lambda: (
                    "pacflow_policy_subscribers 1.0" in _metrics(entries["policyserver"]) and
                    "pacflow_policy_subscribers 2.0" in _metrics(entries[relay]))),
                    "the collectors on the relay, the relay on the policy server", timeout=120)
                # The worker node's policy relay dies too: Ray restarts it on its node, on its
                # port, and the collectors there receive the next versions through it again.
                (relay_pid,) = ray_pids("ray::PolicyRelayWorker", env["HOME"])
                os.kill(relay_pid, signal.SIGKILL)
            pids = until(lambda: running(lambda: ray_pids(title, env["HOME"])),
                          f"{title} in cycle {cycle}")
            victim = rng.choice(sorted(pids))
            children = _env_processes(victim)
            assert len(children) == (1 if target == "collector" else 0), children
            os.kill(victim, signal.SIGKILL)
            killed[target] = (cycle, victim)
            # A killed collector's env processes see their connection close and exit.
            until(lambda: not [p for p in children if _alive(p)],
                  "the killed collector's env processes to exit", timeout=30)
        submit.wait(timeout=900)
    finally:
        if submit.poll() is None:
            submit.kill()
        log.close()
    out = log_path.read_text()
    assert submit.returncode == 0, out[-4000:]
    # The endpoints bind the node's address (not loopback), each answers with its metrics.
    import ray.util

    node_ip = ray.util.get_node_ip_address()
    assert {e["targets"][0].rsplit(":", 1)[0] for e in entries.values()} == {node_ip}
    assert "pacflow_learner_updates_total" in scraped["learner"]
    assert "pacflow_replay_items" in scraped["replay"]
    assert "pacflow_run_phase" in scraped["driver"]
    assert "Job 'raysubmit_" in out and "succeeded" in out

    config = load_config(ROOT / "deploy/configs/smoke.yaml", sets[1::2])
    store = Storage(run)
    state = json.loads(store.get_bytes("cycle.json"))
    rows = state["rows"]
    steps = config.loop.learner_steps_per_cycle
    assert [(r["cycle"], r["policy_version"], r["learner_steps"]) for r in rows] == \
        [(c, c + 1, steps * (c + 1)) for c in range(3)]
    # Both kills were restarts, counted in cycle.json.
    assert state["restarts"].get("learner", 0) >= 1, (killed, state["restarts"])
    assert sum(v for k, v in state["restarts"].items() if k.startswith("actor-")) >= 1
    assert sum(v for k, v in state["restarts"].items() if k.startswith("relay-")) == 1

    # Every collected episode exactly once: the ids are fixed per (cycle, actor, index).
    expected = {episode_identity(run_id(run), "collect", c, f"actor-{i}", k)
                for c in range(3)
                for i, n in enumerate(split(config.loop.episodes(c), config.cluster.num_actors))
                for k in range(n)}
    archive = EpisodeArchive(f"{run}/archive")
    collected = [e for e in archive.episodes() if e.lineage.mode == "collect"]
    assert {e.lineage.episode_id for e in collected} == expected
    assert len(collected) == len(expected) == 3 * config.loop.episodes_per_cycle
    assert archive.verify()[1] == []

    # Collectors ran on the worker node, the servers on the head node (the targets as they
    # were during the run: the driver removes them when it ends).
    assert store.list_files("metrics/targets") == []
    targets = {name: e["labels"]["node_id"] for name, e in entries.items()}
    assert targets["replay"] == targets["policyserver"] != targets["actor-0"] == targets["actor-1"]
    # The relay ran on the collectors' node.
    assert targets[relay] == targets["actor-0"] and relay == f"relay-{targets['actor-0'][:12]}"

    for name in ("config.yaml", "report/returns.png", "replay_checkpoints/LATEST.json",
                 "policies/v000003.json", "logs/learner.log", "logs/actor-0.log"):
        assert store.exists(name), name
    assert len(store.list_dirs("checkpoints")) == 3

    # The nodes' scratch can go: a resumed run restores the learner and replay from S3 alone.
    shutil.rmtree(scratch_dir(run, "replay").parent)  # this run's only: others' stay
    resumed = subprocess.run(
        ["pacflow", "run", "--config", "deploy/configs/smoke.yaml", "--address", gcs,
         "--run-dir", run, "--resume", *sets, "--set", "loop.num_cycles=4"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = json.loads(store.get_bytes("cycle.json"))["rows"]
    assert [(r["cycle"], r["policy_version"], r["learner_steps"]) for r in rows][-1] == \
        (3, 4, 4 * steps)
    replay_log = store.get_bytes("logs/replay.log").decode()
    restored = int(re.findall(r"(\d+) items restored", replay_log)[-1])
    assert restored == sum(e.length for e in collected)


def _relay_subscribers(run: str, env: dict, tmp_path: Path, skip: set[str]) -> dict[str, str]:
    """{relay name: its pacflow_policy_subscribers line} of the run's relays not in `skip`."""
    found = {}
    for name, entry in _targets(run, env, tmp_path).items():
        if name.startswith("relay-") and name not in skip:
            try:
                lines = _metrics(entry).splitlines()
            except OSError:  # not serving yet
                continue
            found[name] = next((x for x in lines if x.startswith("pacflow_policy_subscribers")),
                               "")
    return found


def test_collectors_node_dies_and_a_new_node_gets_them_and_a_relay(cluster, s3_prefix,
                                                                   tmp_path):
    """The node that runs every collector (and its relay) dies: Ray restarts the collectors on
    a node that joins afterwards, the driver starts a relay there after the cycle, the
    collectors receive versions through it, and the run completes with every episode once."""
    env, dashboard, gcs, creds = cluster
    run = f"{s3_prefix[0]}/run-node-lost"
    sets = ["--set", "cluster.server_resource=head", "--set", "cluster.actor_resource=spot",
            "--set", "cluster.learner_resource=worker", "--set", "cluster.host=auto",
            "--set", f"cluster.policy_credentials={creds}", "--set", "loop.num_cycles=4",
            "--set", "loop.learner_steps_per_cycle=50"]
    spare = [_join(env, gcs, '{"spot": 1}')]
    log_path = tmp_path / "submit.log"
    log = open(log_path, "w")
    submit = None
    try:
        until(lambda: _active_nodes(env, int(gcs.rsplit(":", 1)[1])) == 3, "3 active nodes",
              timeout=120, poll=1.0)
        submit = subprocess.Popen(
            ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
             "pacflow", "run", "--config", "deploy/configs/smoke.yaml", "--address", "auto",
             "--run-dir", run, *sets], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

        def running(condition):
            if submit.poll() is not None:
                pytest.fail(f"job ended early: {log_path.read_text()[-4000:]}")
            return condition()

        # Both collectors read the first node's relay.
        first = until(lambda: running(lambda: [n for n, line in _relay_subscribers(
            run, env, tmp_path, set()).items() if line.endswith(" 2.0")]),
            "the collectors on the spot node's relay", timeout=240)
        until(lambda: running(lambda: _completed(run) >= 1), "cycle 1 to start")
        _kill_node(spare[0])  # the machine is gone, all its processes
        spare.append(_join(env, gcs, '{"spot": 1}'))  # its replacement joins
        second = until(lambda: running(lambda: [n for n, line in _relay_subscribers(
            run, env, tmp_path, set(first)).items() if line.endswith(" 2.0")]),
            "both restarted collectors on the new node's relay", timeout=400)
        submit.wait(timeout=900)
    finally:
        if submit is not None and submit.poll() is None:
            submit.kill()
        log.close()
        for node in spare:
            _kill_node(node)
    out = log_path.read_text()
    assert submit.returncode == 0, out[-4000:]
    state = json.loads(Storage(run).get_bytes("cycle.json"))
    assert [r["cycle"] for r in state["rows"]] == [0, 1, 2, 3]
    assert state["restarts"].get("actor-0", 0) >= 1 and state["restarts"].get("actor-1", 0) >= 1
    # The driver forgot the dead node's relay and kept the new one's.
    assert second != first and second[0] in state["addresses"]
    assert first[0] not in state["addresses"]
    # Restarted before the driver started the new node's relay, each collector switched to it.
    for actor in ("actor-0", "actor-1"):
        assert "this node's policy relay has started; receiving versions from it" in \
            Storage(run).get_bytes(f"logs/{actor}.log").decode(), actor
    config = load_config(ROOT / "deploy/configs/smoke.yaml", sets[1::2])
    expected = {episode_identity(run_id(run), "collect", c, f"actor-{i}", k)
                for c in range(4)
                for i, n in enumerate(split(config.loop.episodes(c), config.cluster.num_actors))
                for k in range(n)}
    collected = [e for e in EpisodeArchive(f"{run}/archive").episodes()
                 if e.lineage.mode == "collect"]
    assert sorted(e.lineage.episode_id for e in collected) == sorted(expected)
