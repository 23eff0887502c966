"""`pacflow run --resume` continues a stopped run: cycles, learner, replay and versions."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from replay.archive import EpisodeArchive
from replay.server import ReplayServer
from replay.spec import EnvSpec
from tests.processes import until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(run_dir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run_dir), *extra], capture_output=True, text=True, cwd=ROOT,
        timeout=600)


def test_resume_adds_cycles_to_a_stopped_run(tmp_path):
    """The first run is stopped by SIGTERM (as `ray job stop` stops it) once its first cycle is
    in: it exits 143 and removes its metrics targets; the resume finishes the second cycle."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run_dir), "--set", "loop.num_cycles=1000"], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: first.poll() is None and (run_dir / "cycle.json").exists() and
              json.loads((run_dir / "cycle.json").read_text())["completed_cycles"] >= 1 or
              first.poll() is not None, "the first cycle", timeout=300)
        assert list((run_dir / "metrics" / "targets").iterdir())  # scraped while it runs
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, stderr[-3000:]
    assert list((run_dir / "metrics" / "targets").iterdir()) == []

    again = _run(run_dir, "--set", "loop.num_cycles=1")  # a second run into the same dir
    assert again.returncode == 2 and "pass --resume" in again.stderr

    changed = _run(run_dir, "--resume", "--set", "learner.alpha=0.5")
    assert changed.returncode == 2 and "config differs" in changed.stderr

    resumed = _run(run_dir, "--resume", "--set", "loop.num_cycles=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = load_config(ROOT / "deploy/configs/smoke.yaml")
    rows = json.loads((run_dir / "cycle.json").read_text())["rows"]
    steps = config.loop.learner_steps_per_cycle
    assert [(r["cycle"], r["policy_version"], r["learner_steps"]) for r in rows] == \
        [(0, 1, steps), (1, 2, 2 * steps)]  # the learner continued from its checkpoint

    collected = [e for e in EpisodeArchive(run_dir / "archive").episodes()
                 if e.lineage.mode == "collect"]
    assert sorted((e.lineage.cycle, e.lineage.policy_version) for e in collected) == \
        [(0, 0)] * config.loop.episodes_per_cycle + [(1, 1)] * config.loop.episodes_per_cycle
    meta = json.loads((run_dir / "policies" / "v000002.json").read_text())
    server = ReplayServer(EnvSpec.from_dict(meta["metadata"]["env_spec"]), config.replay,
                          run_dir / "replay_checkpoints")
    try:  # replay holds both cycles: the first run's items were restored on resume
        assert server.num_items() == sum(e.length for e in collected)
    finally:
        server.stop()
