"""`pacflow bench policy-push` writes the DESIGN §6 JSON shape with a same-run Ray baseline."""

import json
import statistics

import pytest

from cluster.bench import format_report
from cluster.bench_push import _memory_shortfall, run_push_bench


@pytest.mark.slow  # starts Ray, a policy server, a relay and three worker processes
def test_policy_push_json(tmp_path):
    out = tmp_path / "push.json"
    report = run_push_bench(str(out), sizes=(10_000,), subscribers=(2,), repeats=2)
    assert json.loads(out.read_text()) == report
    assert report["benchmark"] == "policy-push" and "cores" in report["machine"]
    latency, bandwidth, local, relay = report["results"]
    assert latency["case"] == bandwidth["case"] == local["case"] == relay["case"] == \
        "params=10k,subscribers=2"
    assert local["metric"] == "seconds_until_all_hold_local_read" and local["value"] > 0
    assert local["ratio"] == pytest.approx(latency["baseline"] / local["value"])
    assert len(local["detail"]["local_samples_s"]) == 2
    # Through a relay: the subscribers read its files (the bench raises if one fell back).
    assert relay["metric"] == "seconds_until_all_hold_relay" and relay["value"] > 0
    assert relay["ratio"] == pytest.approx(latency["baseline"] / relay["value"])
    assert len(relay["detail"]["relay_samples_s"]) == 2
    assert (latency["metric"], latency["unit"]) == ("seconds_until_all_hold", "s")
    assert (bandwidth["metric"], bandwidth["unit"]) == ("delivered_gb_per_s", "GB/s")
    assert latency["value"] > 0 and latency["baseline"] > 0
    assert latency["ratio"] == pytest.approx(latency["baseline"] / latency["value"])
    assert bandwidth["ratio"] == pytest.approx(bandwidth["value"] / bandwidth["baseline"])
    assert bandwidth["ratio"] == pytest.approx(latency["ratio"])
    detail = latency["detail"]
    # The bench raises unless every subscriber held each published version (version and sha256).
    assert detail["verified_subscribers"] == detail["subscribers"] == 2
    assert detail["bytes"] > 4 * 10_000  # float32 values plus the safetensors header
    assert len(detail["ours_samples_s"]) == len(detail["baseline_samples_s"]) == 2
    assert latency["value"] == pytest.approx(statistics.median(detail["ours_samples_s"]))
    assert latency["baseline"] == pytest.approx(statistics.median(detail["baseline_samples_s"]))
    assert "seconds_until_all_hold" in format_report(report)


def test_cases_that_cannot_fit_are_refused_up_front():
    assert _memory_shortfall(1 << 20, 2) is None
    assert "GB available" in _memory_shortfall(1 << 40, 16)


@pytest.mark.slow  # Ray, a policy server, a publisher and 4 subscribers taking 128 MB versions
def test_a_streamed_subscriber_holds_little_beyond_its_two_buffers(tmp_path):
    """Subscribers in Ray workers (as actors run them) taking 128 MB versions streamed: the
    peak RSS while taking one version over the RSS just before (the held version and the spare
    buffer the next one fills). With gRPC's BDP-grown receive window it was 49-105 MB on 2
    cores; with the fixed 4 MiB window (policies/stream.py RECEIVE_WINDOW_BYTES) 18-19 MB."""
    report = run_push_bench(None, sizes=(32_000_000,), subscribers=(4,), repeats=2)
    latency = report["results"][0]
    assert latency["metric"] == "seconds_until_all_hold"
    detail = latency["detail"]
    assert detail["verified_subscribers"] == 4
    assert detail["subscriber_peak_growth_bytes"] < 32 << 20, detail
