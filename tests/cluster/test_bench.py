"""`pacflow bench learner` writes the DESIGN §6 JSON shape with same-run baselines."""

import json

import pytest

from cluster.cli import main

pytestmark = pytest.mark.slow


def test_bench_learner_json(tmp_path, capsys):
    out = tmp_path / "learner.json"
    assert main(["bench", "learner", "--preset", "tiny", "--steps", "3", "--batch-size", "16",
                 "--device", "cpu", "--threads", "1", "--threads", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "learner" and "cores" in report["machine"]
    cases = sorted({r["case"] for r in report["results"]})
    assert cases == ["preset=tiny,batch=16,device=cpu,threads=1",
                     "preset=tiny,batch=16,device=cpu,threads=2"]  # thread counts measured
    by_metric = {r["metric"]: r for r in report["results"] if r["case"] == cases[0]}
    assert set(by_metric) == {"updates_per_s", "samples_per_s", "data_wait_fraction",
                              "parameters"}  # no MFU without CUDA
    ups = by_metric["updates_per_s"]
    assert ups["value"] > 0 and ups["baseline"] > 0
    assert ups["ratio"] == pytest.approx(ups["value"] / ups["baseline"])
    assert 0 <= by_metric["data_wait_fraction"]["value"] < 1
    assert "updates_per_s" in capsys.readouterr().out


def test_unknown_preset_is_a_usage_error(capsys):
    assert main(["bench", "learner", "--preset", "huge"]) == 2
    assert "--preset: 'huge' is not one of" in capsys.readouterr().err
