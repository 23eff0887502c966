"""`pacflow bench samplers`: the JSON of 1 and 2 sampling processes against one Reverb server,
with the 1-sampler rate of the same run as the baseline. Tiny counts; no timing is asserted."""

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
    report = run_sampler_bench((2,), batch_size=16, batches=3, episodes=2, json_path=str(out))
    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "samplers" and "cores" in report["machine"]
    assert report["table_items"] == 2 * 125
    one, two = report["results"]  # 1 is always measured: it is the baseline
    size = item_bytes(BENCH_SPEC, 5)  # the demo's items: cartpole, n-step 5
    assert (one["case"], two["case"]) == (f"samplers=1,batch=16,item={size}B",
                                          f"samplers=2,batch=16,item={size}B")
    assert one["value"] == one["baseline"] == two["baseline"] > 0 and one["ratio"] == 1.0
    assert two["value"] > 0 and two["ratio"] == pytest.approx(two["value"] / one["value"])
    assert "sample_items_per_s" in format_report(report)


def test_samplers_must_be_positive():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "samplers",
                             "--samplers", "0"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr.strip() == "pacflow: error: --samplers must be >= 1"
