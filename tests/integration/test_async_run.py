"""deploy/configs/smoke_async.yaml (loop.mode: async) through the CLI on a local Ray cluster,
with a collector and the learner killed during the run."""

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from actors.loop import episode_identity
from cluster.config import load_config
from cluster.topology import split
from replay.archive import EpisodeArchive
from replay.storage import run_id
from tests.processes import ray_pids, until

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "deploy/configs/smoke_async.yaml"
pytestmark = pytest.mark.slow


def _rows(run: Path) -> int:
    state = run / "cycle.json"
    return json.loads(state.read_text())["completed_cycles"] if state.exists() else 0


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    """The async smoke run, with a collector's and the learner's worker process SIGKILLed
    during it (after a number of published versions drawn from a seeded RNG)."""
    base = tmp_path_factory.mktemp("async")
    run_dir, home = base / "run", base / "home"  # HOME tells this run's Ray workers apart
    home.mkdir()
    rng = random.Random(20261204)
    kills = sorted([(rng.randrange(1, 4), "ray::CollectorWorker.collect"),
                    (rng.randrange(2, 6), "ray::LearnerWorker")])  # threaded: no method
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "run", "--config", CONFIG, "--run-dir",
         str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "HOME": str(home)})
    try:
        for rows, title in kills:
            def running(condition):
                if proc.poll() is not None:
                    pytest.fail(f"run ended early: {proc.stderr.read()[-3000:]}")
                return condition()

            until(lambda: running(lambda: _rows(run_dir) >= rows), f"{rows} versions")
            pids = until(lambda: running(lambda: ray_pids(title, str(home))), title)
            os.kill(rng.choice(sorted(pids)), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return run_dir, stdout, load_config(ROOT / CONFIG)


def test_runs_until_the_env_step_budget_publishing_as_it_trains(async_run):
    run_dir, stdout, config = async_run
    state = json.loads((run_dir / "cycle.json").read_text())
    rows, loop = state["rows"], config.loop
    assert state["mode"] == "async"
    # One row per published version, each publish_every updates after the last (the final
    # chunk may stop early when collection has ended).
    assert [r["policy_version"] for r in rows] == list(range(1, len(rows) + 1))
    steps = [r["learner_steps"] for r in rows]
    assert steps[:-1] == [loop.learner_steps_per_cycle * (i + 1) for i in range(len(rows) - 1)]
    assert steps[-2] < steps[-1] <= steps[-2] + loop.learner_steps_per_cycle
    # No collect call starts past the budget; the calls in flight then (one per actor) finish.
    per_call = max(split(loop.episodes_per_cycle, config.cluster.num_actors)) * 1000
    assert loop.max_env_steps <= rows[-1]["env_steps"] <= \
        loop.max_env_steps + config.cluster.num_actors * per_call
    # The last version is evaluated by the evaluator, and so is every eval_every-th before it.
    assert rows[-1]["eval_return"] is not None
    evaluated = [r["policy_version"] for r in rows if r["eval_return"] is not None]
    assert evaluated[:-1] and all(v % loop.eval_every == 0 for v in evaluated[:-1])
    assert f"version {rows[-1]['policy_version']} evaluated:" in stdout


def test_actors_act_while_the_learner_trains(async_run):
    """Collection overlaps training: steps are acted by a version older than the newest one
    (in cycles mode staleness is 0 by construction), and replay's sample_to_insert limiter held
    the learner's samples per insert within its bounds."""
    run_dir, _, config = async_run
    state = json.loads((run_dir / "cycle.json").read_text())
    assert state["staleness"]["max"] >= 1 and 0 < state["staleness"]["mean"] < 2
    replay = state["replay"]
    assert replay["samples_per_insert"] == config.replay.samples_per_insert
    cursor = replay["inserts"] * replay["samples_per_insert"] - replay["samples"]
    assert replay["min_diff"] <= cursor <= replay["max_diff"]
    assert replay["samples"] >= state["rows"][-1]["learner_steps"] * config.learner.batch_size
    assert 0 < state["busy_fraction"]["actors"] <= 1
    assert 0 < state["busy_fraction"]["learner"] <= 1


def test_killed_collector_and_learner_were_restarted(async_run):
    run_dir, _, _ = async_run
    restarts = json.loads((run_dir / "cycle.json").read_text())["restarts"]
    assert restarts.get("learner") == 1, restarts
    assert sum(v for k, v in restarts.items() if k.startswith("actor-")) == 1, restarts


def test_every_collected_episode_is_archived_once(async_run):
    """The archive holds exactly the episode ids of the collect calls made (per actor, one
    round per call), each once, and the evaluator's greedy episodes apart."""
    run_dir, _, config = async_run
    state = json.loads((run_dir / "cycle.json").read_text())
    episodes = list(EpisodeArchive(run_dir / "archive").episodes())
    collected = [e for e in episodes if e.lineage.mode == "collect"]
    per_actor = split(config.loop.episodes_per_cycle, config.cluster.num_actors)
    rid = run_id(str(run_dir))
    expected = {episode_identity(rid, "collect", r, f"actor-{i}", k)
                for i, rounds in enumerate(state["collect_rounds"])
                for r in range(rounds) for k in range(per_actor[i])}
    ids = Counter(e.lineage.episode_id for e in collected)
    assert set(ids) == expected and set(ids.values()) == {1}
    assert len(collected) == state["rows"][-1]["episodes"]
    # Replay holds each of them whole and once, although a collector was SIGKILLed while
    # writing: the run's replay process writes episodes, one at a time (#11 item 5).
    assert state["replay"]["episodes"] == len(collected), state["replay"]
    assert state["replay"]["items"] == sum(e.length for e in collected), state["replay"]
    versions = {e.lineage.policy_version for e in collected}
    assert 0 in versions and len(versions) >= 3  # random first, then the versions pushed
    evals = [e for e in episodes if e.lineage.mode == "eval"]
    assert {e.lineage.actor_id for e in evals} == {"evaluator"}
    assert len(evals) % config.loop.eval_episodes == 0 and evals
    assert (run_dir / "logs" / "evaluator.log").exists()
