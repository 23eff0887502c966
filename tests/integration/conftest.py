"""The smoke run, shared by the integration tests that inspect or reuse its run directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke run, with its policy server on mutual TLS + tokens: cycle 1 collects with the
    version the actors received over it."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    creds = run_dir.parent / "creds"
    subprocess.run([sys.executable, "-m", "cluster.cli", "policy", "gen-certs", str(creds)],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", "--config", "deploy/configs/smoke.yaml",
         "--run-dir", str(run_dir), "--set", f"cluster.policy_credentials={creds}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout, load_config(ROOT / "deploy/configs/smoke.yaml")


