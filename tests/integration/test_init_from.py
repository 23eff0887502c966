"""Fine-tuning, the stacking paper's second mode: `pacflow run --init-from SNAPSHOT` starts the
learner from an earlier run's policy, publishes it as v1, collects cycle 0 with it, and records
it in every snapshot's metadata. A snapshot of another network is refused before anything
starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from policies.perceiver import PerceiverActorCritic
from policies.snapshot import Snapshot, load_snapshot, save_snapshot, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml"]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_a_run_fine_tunes_from_an_earlier_snapshot(tmp_path):
    config = load_config(ROOT / "deploy/configs/smoke.yaml")
    spec = config.env.spec()
    torch.manual_seed(3)
    weights = PerceiverActorCritic(spec, config.model).state_dict()
    base = Snapshot.from_state_dict(5, weights, snapshot_metadata(
        spec.to_dict(), config.model, 4, 1234, 4))
    path = save_snapshot(base, tmp_path / "earlier" / "policies")

    other = subprocess.run([*CLI, "--init-from", path, "--set", "model.width=32",
                            "--run-dir", str(tmp_path / "other")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and not (tmp_path / "other").exists()
    assert other.stderr.strip().splitlines() == [
        f"pacflow: error: learner.init_from: snapshot {path} has another model_config "
        "(differs in width)"]

    run = tmp_path / "run"
    tuned = subprocess.run([*CLI, "--init-from", path, "--set", "loop.num_cycles=1",
                            "--run-dir", str(run)], cwd=ROOT, capture_output=True, text=True,
                           timeout=500)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert f"published v1, the initial policy ({path})" in tuned.stdout
    first, second = (load_snapshot(run / "policies" / f"v00000{v}.json") for v in (1, 2))
    lineage = {"snapshot": path, "version": 5, "sha256": base.sha256}
    assert first.metadata["init_from"] == second.metadata["init_from"] == lineage
    assert all(torch.equal(t, weights[k]) for k, t in first.state_dict().items())
    assert not all(torch.equal(t, weights[k]) for k, t in second.state_dict().items())
    collected = [e.lineage for e in EpisodeArchive(run / "archive").episodes()
                 if e.lineage.mode == "collect"]
    assert collected and {lin.policy_version for lin in collected} == {1}  # not random v0
    assert f"init_from: {path}" in Storage(run).get_bytes("config.yaml").decode()


@pytest.mark.timeout(600)
def test_a_base_policy_retrains_on_several_robot_archives(tmp_path):
    """The third mode: `pacflow train-offline` with an --archive per earlier run, robot task
    only (nothing to evaluate in a simulator). An episode archived in both is used once; the
    snapshot names every archive with its manifest hash and count."""
    from actors.envs import make_env_spec
    from tests.fakes import make_episode

    spec = make_env_spec(["robot:deploy/robots/cartpole.yaml"], 8)
    first, second = EpisodeArchive(tmp_path / "a"), EpisodeArchive(tmp_path / "b")
    episodes = [make_episode(length=20, spec=spec, seed=i) for i in range(10)]
    for e in episodes[:6]:
        first.write(e)
    for e in episodes[5:]:  # episode 5 is in both
        second.write(e)
    out = tmp_path / "base"
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train-offline", "--archive", str(tmp_path / "a"),
         "--archive", str(tmp_path / "b"), "--config", "deploy/configs/robot_fleet.yaml",
         "--steps", "20", "--run-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 20 steps on 10 episodes" in done.stdout
    assert "not evaluated (robot tasks only)" in done.stdout
    trained_on = load_snapshot(out / "policies" / "v000001.json").metadata["trained_on"]
    assert trained_on["episodes"] == trained_on["episodes_loaded"] == 10
    assert [(a["archive"], a["episodes"]) for a in trained_on["archives"]] == \
        [(str(tmp_path / "a"), 6), (str(tmp_path / "b"), 5)]
    assert len({a["manifest_sha256"] for a in trained_on["archives"]}) == 2
