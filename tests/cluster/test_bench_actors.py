"""`pacflow bench actors` measures both sides on the same environments and writes JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_actors_json_two_actors_side_by_side(tmp_path):
    from cluster import bench_actors
    from cluster.bench_actors import ActorCase, run_actor_bench

    out = tmp_path / "actors.json"
    case = ActorCase("dm_control:cartpole-swingup", actors=2, envs=2, preset="tiny",
                     pixels=False)
    report = run_actor_bench([case], rounds=1, json_path=str(out), out=lambda _: None, waves=2)
    assert json.loads(out.read_text()) == report
    (row,) = report["results"]
    assert row["case"] == "task=cartpole-swingup,actors=2,envs=2,preset=tiny,pixels=0"
    # Both sides stepped whole episodes: 2 actors x 2 waves x 2 envs x 1000 steps in the
    # timed round (ours asserts that every episode was archived and replayed, not quarantined).
    assert row["env_steps"] == {"raw": 8000, "ours": 8000}
    assert report["waves"] == 2
    assert row["value"] > 0 and row["baseline"] > 0
    assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    assert 0 < row["ratio"] < 1.5  # the loop does the raw side's stepping and more
    assert bench_actors.default_cases(quick=True) == [
        ActorCase("dm_control:cartpole-swingup", 1, k, "tiny", False) for k in (1, 4)]
    assert len(bench_actors.default_cases()) == 48


def test_bench_actors_refuses_an_unknown_task():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "actors", "--task",
                             "dm_control:cheetah-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("pacflow: error: --task: actors benchmarks ")


def test_bench_actors_refuses_zero_waves():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "actors", "--waves",
                             "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "pacflow: error: --rounds and --waves must be >= 1"


def test_cases_are_selected_by_preset_task_observations_and_counts():
    from cluster.bench_actors import ActorCase, default_cases, select_cases

    grid = default_cases()
    walker_pixels = select_cases(grid, ["small"], "dm_control:walker-walk", ["pixels"])
    assert walker_pixels == [ActorCase("dm_control:walker-walk", a, k, "small", True)
                             for a in (1, 2) for k in (1, 4, 16)]
    # Counts outside the grid replace each kept case's own, once each.
    assert select_cases(grid, ["tiny"], None, ["state"], actors=[8], envs=[32, 64]) == [
        ActorCase(t, 8, k, "tiny", False) for t in ("dm_control:cartpole-swingup",
                                                     "dm_control:walker-walk") for k in (32, 64)]
    assert select_cases(grid) == grid


def test_bench_actors_refuses_zero_envs():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "actors", "--envs",
                             "4", "--envs", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "pacflow: error: --envs must be >= 1"


def test_bench_actors_refuses_more_env_processes_than_envs():
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "actors", "--envs",
                             "4", "--envs", "16", "--env-processes", "4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("pacflow: error: --env-processes 4: give 0 to one less "
                                     "than the fewest --envs of the cases (4)")
