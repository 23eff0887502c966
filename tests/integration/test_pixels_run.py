"""A pixel run (camera images + proprioception + an instruction) through Ray, Reverb and gRPC,
rendering with the CPU's OSMesa, via the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load_config
from policies.policy import PACPolicy
from policies.snapshot import load_snapshot
from replay.archive import EpisodeArchive
from replay.server import ReplayServer, sample_items

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
OVERRIDES = ["env.pixels=[32, 32]", "model.patch_size=8", "loop.num_cycles=1",
             "env.instructions=['swing the pole up']"]


def test_pixel_run_archives_replays_and_acts_on_camera_images(tmp_path):
    run_dir = tmp_path / "run"
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run_dir), *sets], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config(run_dir / "config.yaml")
    assert config.env.pixels == (32, 32)

    episodes = list(EpisodeArchive(run_dir / "archive").episodes())
    assert episodes and all(e.pixels.shape == (e.length + 1, 32, 32, 3) for e in episodes)
    frames = {f.tobytes() for e in episodes for f in e.pixels}

    snapshot = load_snapshot(sorted((run_dir / "policies").glob("*.json"))[-1])
    policy = PACPolicy.from_snapshot(snapshot, seed=0)
    spec = policy.model.spec
    assert spec.pixels_shape == (32, 32, 3) and spec.tasks[0].instruction == "swing the pole up"
    server = ReplayServer(spec, config.replay, run_dir / "replay_checkpoints")  # restore
    try:
        items = sample_items(server.address, config.replay.table, 16)
    finally:
        server.stop()
    assert items["pixels"].shape == (16, config.replay.n_step + 1, 32, 32, 3)
    assert items["pixels"][0, 0].tobytes() in frames

    first = episodes[0]
    actions = policy.act(first.observation[:2], np.zeros(2, np.int64), True, first.pixels[:2])
    assert actions.shape == (2, spec.action_dim) and np.isfinite(actions).all()
