"""The smoke run, shared by the integration tests that inspect or reuse its run directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run_dir)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout, load_config(ROOT / "deploy/configs/smoke.yaml")


