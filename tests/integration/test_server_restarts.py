"""The replay server and the policy server of a `pacflow run` are SIGKILLed while the actors
collect (each in a cycle drawn from a seeded RNG). Ray restarts both from run storage, their
clients find the new incarnations (`<run>/addresses/`), and the run finishes with every episode
archived once, every version published, and replay holding every collected episode whole and
once: what the dead replay server lost since its checkpoint is written again from the archive."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from replay.archive import EpisodeArchive
from tests.processes import ray_pids, until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
CYCLES = 4
SETS = ["--set", f"loop.num_cycles={CYCLES}", "--set", "replay.timeout_seconds=30"]


def _completed(run: Path) -> int:
    state = run / "cycle.json"
    return json.loads(state.read_text())["completed_cycles"] if state.exists() else 0


@contextlib.contextmanager
def _smoke_run(tmp_path: Path, sets: list[str]):
    """`pacflow run` of the smoke config in a process of its own, logging to `run.log`, with a
    HOME of its own (its Ray workers are told apart from any other's by it). Yields (run dir,
    home, process, running), where running(condition) fails the test with the run's log if the
    run has ended, else returns condition(); the run is killed if still going at the end."""
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
             "--run-dir", str(run), *sets], env={**os.environ, "HOME": str(home)}, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT)

        def running(condition):
            if proc.poll() is not None:
                pytest.fail(f"run ended early: {log_path.read_text()[-4000:]}")
            return condition()

        try:
            yield run, home, proc, running
        finally:
            if proc.poll() is None:
                proc.kill()


def test_run_survives_killed_replay_and_policy_servers(tmp_path):
    rng = random.Random(20261203)
    kills = dict(zip(("replay", "policyserver"), rng.sample(range(1, CYCLES), 2)))
    titles = {"replay": "ray::ReplayWorker", "policyserver": "ray::PolicyServerWorker"}
    with _smoke_run(tmp_path, SETS) as (run, home, proc, running):
        for name, cycle in sorted(kills.items(), key=lambda kv: kv[1]):
            # While this cycle's actors collect: episodes are being written to replay.
            until(lambda: running(lambda: _completed(run) >= cycle), f"cycle {cycle}")
            until(lambda: running(lambda: ray_pids("ray::CollectorWorker.collect",
                                                   str(home))), f"collect in cycle {cycle}")
            (victim,) = until(lambda: running(lambda: ray_pids(titles[name], str(home))),
                              name)
            os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=900)
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-4000:]

    config = load_config(ROOT / "deploy/configs/smoke.yaml", SETS[1::2])
    state = json.loads((run / "cycle.json").read_text())
    assert state["restarts"] == {"replay": 1, "policyserver": 1}, (kills, state["restarts"])
    steps = config.loop.learner_steps_per_cycle
    assert [(r["cycle"], r["policy_version"], r["learner_steps"]) for r in state["rows"]] == \
        [(c, c + 1, steps * (c + 1)) for c in range(CYCLES)]
    assert sorted(p.name for p in (run / "policies").glob("v*.json")) == \
        [f"v{v:06d}.json" for v in range(1, CYCLES + 1)]

    # Every collected episode once, acted by the version of its cycle.
    collected = [e for e in EpisodeArchive(run / "archive").episodes()
                 if e.lineage.mode == "collect"]
    assert len(collected) == len({e.lineage.episode_id for e in collected}) == \
        CYCLES * config.loop.episodes_per_cycle
    assert {(e.lineage.cycle, e.lineage.policy_version) for e in collected} == \
        {(c, c) for c in range(CYCLES)}

    # Replay converged with the archive: the restarted server restored its last checkpoint
    # (taken after the previous cycle's collection), wrote again from the archive what it had
    # lost, and took the actors' repeated writes once. Every archived collect episode is in
    # replay whole (one item per transition) and once; before, the killed cycle's were lost.
    total = sum(e.length for e in collected)
    assert state["replay"]["episodes"] == len(collected), state["replay"]
    assert state["replay"]["items"] == total, state["replay"]
    assert "restarted (1 so far)" in (run / "logs" / "replay.log").read_text()
    assert "restarted (1 so far)" in (run / "logs" / "policyserver.log").read_text()


def test_run_survives_a_killed_env_process(tmp_path):
    """A collector with two tasks steps one of its envs of each in a child process
    (cluster.env_processes=1; the tasks share the child); that child is SIGKILLed while it
    collects: the collector exits so Ray restarts it, the collect call is repeated, and every
    episode is archived once."""
    import psutil

    tasks = ["dm_control:cartpole-swingup", "dm_control:cartpole-balance"]
    sets = ["--set", "loop.num_cycles=3", "--set", "cluster.env_processes=1",
            "--set", "cluster.num_actors=1", "--set", f"env.tasks=[{', '.join(tasks)}]"]
    cycle = random.Random(20261204).randrange(0, 3)
    with _smoke_run(tmp_path, sets) as (run, home, proc, running):
        def env_children() -> list[int]:  # the env processes of collectors collecting now
            return [c.pid for pid in ray_pids("ray::CollectorWorker.collect", str(home))
                    for c in psutil.Process(pid).children()
                    if "actors.env_group" in " ".join(c.cmdline())]

        until(lambda: running(lambda: _completed(run) >= cycle), f"cycle {cycle}")
        children = until(lambda: running(env_children), f"an env process in cycle {cycle}")
        assert len(children) == 1, children  # one for both tasks
        os.kill(children[0], signal.SIGKILL)
        proc.wait(timeout=900)
    output = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, output[-4000:]
    # the smoke config's actor_cpus=0.5 does not reserve the child's core: said once
    assert output.count("set cluster.actor_cpus=2") == 1, output[-4000:]
    state = json.loads((run / "cycle.json").read_text())
    assert [r["cycle"] for r in state["rows"]] == [0, 1, 2]
    restarted = {k: v for k, v in state["restarts"].items() if v}
    assert len(restarted) == 1 and list(restarted.values()) == [1], state["restarts"]
    (actor,) = restarted
    assert "exited with code -9 (negative: killed by that signal); exiting so that Ray " \
        "restarts this collector" in \
        (run / "logs" / f"{actor}.log").read_text()
    config = load_config(ROOT / "deploy/configs/smoke.yaml", sets[1::2])
    collected = [e for e in EpisodeArchive(run / "archive").episodes()
                 if e.lineage.mode == "collect"]
    assert len(collected) == len({e.lineage.episode_id for e in collected}) == \
        3 * config.loop.episodes_per_cycle
    assert {e.lineage.task for e in collected} == set(tasks)
