"""`pacflow bench samplers`: the JSON of sampling processes against one Reverb server, with the
1-sampler rate of the same run as the baseline. Tiny counts; no timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench import BENCH_SPEC, format_report
from cluster.bench_replay import item_bytes
from cluster.bench_samplers import run_sampler_bench

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_samplers_json(tmp_path):
    out = tmp_path / "samplers.json"
    # One sampler process (each imports TensorFlow: 2 s of a CPU); 1 is always measured.
    report = run_sampler_bench((1,), batch_size=16, batches=3, episodes=2, json_path=str(out))
    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "samplers" and "cores" in report["machine"]
    assert report["table_items"] == 2 * 125
    (one,) = report["results"]
    size = item_bytes(BENCH_SPEC, 5)  # the demo's items: cartpole, n-step 5
    assert one["case"] == f"samplers=1,batch=16,item={size}B"
    assert one["value"] == one["baseline"] > 0 and one["ratio"] == 1.0
    assert one["unit"] == "1/s" and one["metric"] == "sample_items_per_s"
    assert "sample_items_per_s" in format_report(report)


def test_samplers_must_be_positive():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "samplers",
                             "--samplers", "0"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr.strip() == "pacflow: error: --samplers must be >= 1"
