"""`pacflow replay serve`: a standalone Reverb server that checkpoints and restores."""

import signal
import subprocess
import sys
from pathlib import Path

from cluster.config import load_config
from replay.adders import ReverbSequenceAdder
from replay.server import ReplayServer
from tests.fakes import make_episode

ROOT = Path(__file__).resolve().parents[2]


def _serve(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "replay", "serve", "--config",
         "deploy/configs/smoke.yaml", "--dir", str(tmp_path / "ckpt")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("replay serving"), line
    return proc, line.split(" on ")[1].split()[0]


def test_serve_checkpoints_at_shutdown_and_restores(tmp_path):
    from actors.envs import make_env_spec

    config = load_config(ROOT / "deploy/configs/smoke.yaml")
    spec = make_env_spec(config.env.tasks, config.env.action_repeat)
    proc, address = _serve(tmp_path)
    try:
        episode = make_episode(length=5, spec=spec)
        assert ReverbSequenceAdder(address, config.replay).add_episode(episode) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "(5 items); stopping" in out
    restarted, address = _serve(tmp_path)  # a new process restores the 5 items
    restarted.send_signal(signal.SIGTERM)
    restarted.communicate(timeout=120)
    server = ReplayServer(spec, config.replay, tmp_path / "ckpt")
    try:
        assert server.num_items() == 5
    finally:
        server.stop()
