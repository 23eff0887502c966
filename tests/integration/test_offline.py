"""`pacflow train-offline` retrains from the smoke run's archive, loaded or streamed through Ray
Data, and its snapshot records the data and drives an actor's acting loop."""

import json
import subprocess
import sys

import numpy as np
import pytest

from actors.loop import EnvironmentLoop, EpisodeContext
from cluster.config import load_config
from policies.policy import PACPolicy
from policies.snapshot import load_snapshot
from replay.archive import EpisodeArchive

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _train_offline(run_dir, archive, *args):
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train-offline", "--archive", str(archive),
         "--config", "deploy/configs/smoke.yaml", "--run-dir", str(run_dir), "--steps", "15",
         "--set", "loop.eval_episodes=1", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads((run_dir / "result.json").read_text()), "stdout": result.stdout}


def test_retrain_from_the_archive_and_act_with_the_snapshot(smoke_run, tmp_path):
    archive = smoke_run[0] / "archive"
    result = _train_offline(tmp_path / "offline", archive, "--where", "cycle <= 0",
                            "--log-every", "5", "--eval-every", "10")
    cycle0 = [e for e in EpisodeArchive(archive).episodes()
              if e.lineage.mode == "collect" and e.lineage.cycle == 0]
    meta_path = next((tmp_path / "offline" / "policies").glob("*.json"))
    snapshot = load_snapshot(meta_path)
    trained_on = snapshot.metadata["trained_on"]
    assert trained_on["episodes"] == len(cycle0) == result["data"]["episodes"]
    assert trained_on["filter"] == "cycle <= 0" and trained_on["archive"] == str(archive)
    assert trained_on["manifest_sha256"] == result["data"]["manifest_sha256"]
    assert result["steps"] == 15 and np.isfinite(result["learner"]["loss"])
    # Progress every 5 updates (rate, ETA, losses); a greedy evaluation at 10 and at the end.
    progress = [line for line in result["stdout"].splitlines() if line.startswith("updates ")]
    assert [line.split()[1] for line in progress] == ["5/15", "10/15", "15/15"]
    assert all("/s" in line and "ETA" in line and "l_q" in line for line in progress)
    assert ["eval" in line for line in progress] == [False, True, True]
    assert [p["updates"] for p in result["curve"]] == [10, 15]
    assert all(np.isfinite(p["eval_mean"]) for p in result["curve"])

    config = load_config(ROOT / "deploy/configs/smoke.yaml")
    task = config.env.tasks[0]
    policy = PACPolicy.from_snapshot(snapshot, seed=0)
    loop = EnvironmentLoop([config.env.make(task, seed=1)], policy.model.spec)
    (episode,) = loop.run(policy, [3], EpisodeContext("t", 0, "actor-0", task, 0, "eval"), True)
    assert episode.length == 125 and (episode.policy_version == snapshot.version).all()


def test_streaming_through_ray_data_keeps_the_table_bounded(smoke_run, tmp_path):
    archive = smoke_run[0] / "archive"
    max_size = 150  # far fewer than the archive's items: streaming must evict and refill
    result = _train_offline(tmp_path / "stream", archive, "--stream",
                            "--set", f"replay.max_size={max_size}")
    total_items = sum(e.length for e in EpisodeArchive(archive).episodes()
                      if e.lineage.mode == "collect")
    assert total_items > 2 * max_size
    data = result["data"]
    assert data["streamed"] is True and data["episodes_streamed"] >= 2
    assert data["episodes"] == len([e for e in EpisodeArchive(archive).episode_table()
                                    .column("mode").to_pylist() if e == "collect"])
    assert 0 < data["table_items_at_end"] <= max_size
