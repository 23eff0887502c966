"""`pacflow bench replay` writes the DESIGN §6 JSON shape with same-run raw Reverb baselines.
Tiny counts; no timing is asserted."""

import dataclasses
import json

import pytest

from cluster.bench import format_report
from cluster.bench_replay import DEFAULT_CASES, run_replay_bench

pytestmark = pytest.mark.slow

FIELDS = {"case", "metric", "value", "unit", "baseline", "ratio"}


def test_bench_replay_json(tmp_path):
    cases = [dataclasses.replace(c, episode_length=12, insert_episodes=2, sample_batches=2,
                                 batch_size=8) for c in DEFAULT_CASES]
    out = tmp_path / "replay.json"
    report = run_replay_bench(str(out), cases=cases, rounds=2)
    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "replay" and "cores" in report["machine"]
    rows = report["results"]
    assert all(set(r) == FIELDS for r in rows)
    assert [(r["case"], r["metric"]) for r in rows] == [
        (c.name, m) for c in cases for m in ("insert_items_per_s", "sample_items_per_s",
                                             "item_bytes")]
    for r in rows:
        if r["metric"] == "item_bytes":
            assert r["baseline"] is None and r["ratio"] is None and r["unit"] == "B"
            continue
        assert r["unit"] == "1/s" and r["value"] > 0 and r["baseline"] > 0 and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(r["value"] / r["baseline"])
    pixel_bytes = next(r["value"] for r in rows
                       if r["metric"] == "item_bytes" and r["case"] == cases[1].name)
    assert pixel_bytes > (cases[1].n_step + 1) * 64 * 64 * 3
    assert "sample_items_per_s" in format_report(report)
