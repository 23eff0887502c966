"""`pacflow bench learning` on a real local Ray run: the budget stops the loop, the last cycle is
evaluated, and the JSON holds the curve, the random baseline and the interval."""

import json
import subprocess
import sys

import pytest

from cluster.bench_learning import iqm_with_interval

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_iqm_trims_a_quarter_from_each_end():
    iqm, low, high = iqm_with_interval([1.0, 2.0, 3.0, 4.0, 100.0])
    assert iqm == pytest.approx(3.0)  # mean of 2, 3, 4
    assert low <= iqm <= high and high < 100
    assert iqm_with_interval([5.0]) == (5.0, 5.0, 5.0)


def test_budgeted_learning_bench_writes_curves_against_random(tmp_path):
    budget_minutes = 0.5
    out = tmp_path / "learning.json"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "bench", "learning",
         "--task", "dm_control:cartpole-swingup", "--config", "deploy/configs/smoke.yaml",
         "--budget-minutes", str(budget_minutes), "--seeds", "1", "--json", str(out),
         "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "learning" and report["budget_minutes"] == budget_minutes
    (run,) = report["runs"]
    curve = run["curve"]
    cycles = len(curve["cycle"])
    assert cycles >= 2  # the smoke config's num_cycles (2) was lifted; the budget ended it
    assert run["wall_seconds"] < budget_minutes * 60 + max(curve["seconds"][-1], 30)
    assert curve["eval_return"][-1] == run["final_eval_return"]
    assert curve["env_steps"] == sorted(curve["env_steps"]) and curve["env_steps"][0] > 0
    seed_row, agg = report["results"]
    assert seed_row["baseline"] == run["random_return"] == curve["collect_return"][0]
    assert seed_row["ratio"] == pytest.approx(run["final_eval_return"] / run["random_return"])
    assert agg["metric"] == "final_eval_return_iqm" and agg["value"] == run["final_eval_return"]
    assert "final greedy return" in result.stdout


def test_unknown_task_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "learning", "--task",
                             "dm_control:nope-nothing", "--budget-minutes", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "--task" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
