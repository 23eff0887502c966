"""`pacflow metrics targets`: the file_sd file Prometheus reads, gathered from runs in any
storage (here a real S3 server, moto's, and a local folder)."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cluster.discovery import clear_targets, read_targets
from cluster.process import serve_metrics
from replay.storage import Storage
from tests.processes import until

ROOT = Path(__file__).resolve().parents[2]


def _targets(out: Path) -> dict[str, str]:
    return {e["labels"]["instance_name"]: e["targets"][0] for e in json.loads(out.read_text())}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "metrics", "targets", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def test_targets_of_every_run_under_an_s3_prefix(s3_prefix, tmp_path):
    root, _ = s3_prefix
    for run, name in (("run-a", "learner"), ("run-a", "actor-0"), ("run-b", "replay")):
        serve_metrics(f"{root}/{run}", name)  # a real endpoint, announced in S3
    Storage(f"{root}/not-a-run").put_bytes("notes.txt", b"")
    out = tmp_path / "sd" / "runs.json"
    result = _cli("--under", root, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"3 targets written to {out}"
    found = _targets(out)
    assert sorted(found) == ["actor-0", "learner", "replay"]
    labels = {e["labels"]["run_id"] for e in json.loads(out.read_text())}
    assert labels == {"run-a", "run-b"}
    # Each target answers with the metrics of its process.
    with urllib.request.urlopen(f"http://{found['learner']}/metrics", timeout=10) as r:
        assert r.status == 200
    # A run that ended (the driver clears its targets) drops out.
    clear_targets(f"{root}/run-a")
    assert read_targets(f"{root}/run-a") == []
    assert _cli("--under", root, "--out", str(out)).returncode == 0
    assert sorted(_targets(out)) == ["replay"]


def test_named_local_runs_and_usage_errors(tmp_path):
    serve_metrics(str(tmp_path / "run"), "driver")
    out = tmp_path / "runs.json"
    assert _cli(str(tmp_path / "run"), "--out", str(out)).returncode == 0
    assert list(_targets(out)) == ["driver"]
    missing = _cli("--out", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("pacflow: error: metrics targets: name a run, or --under "
                                      "a folder of runs")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_standalone_gateway_serves_its_metrics_with_metrics_port(tmp_path, stop):
    """`pacflow policy serve --metrics-port 0`: the gateway's own metrics on a free port; stopped
    by either signal, it waits for a final scrape."""
    import numpy as np

    from cluster.config import load_config
    from policies.client import PolicyClient
    from tests.fakes import make_episode

    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "policy", "serve", str(tmp_path / "run"),
         "--config", "deploy/configs/smoke.yaml", "--plaintext", "--metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        metrics_line, listening = server.stdout.readline(), server.stdout.readline()
        assert metrics_line.startswith("metrics on http://127.0.0.1:"), metrics_line
        url = metrics_line.split()[-1]
        address = listening.split("listening on ")[1].split()[0]
        spec = load_config(ROOT / "deploy/configs/smoke.yaml").env.spec()
        bad = make_episode(spec=spec, length=5)
        bad.reward[1] = np.nan
        with PolicyClient(address) as client:
            assert client.upload_episode(bad).quarantined
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        assert "pacflow_policy_published_version 0.0" in text
        assert 'pacflow_policy_uploads_total{result="quarantined"} 1.0' in text
        assert 'pacflow_episodes_quarantined_total{reason="reward"} 1.0' in text
        # Stopped after being scraped, it waits for one more scrape (its final counts) before
        # it exits (cluster.final_scrape_seconds, 15 s here), and exits once that is sent.
        with PolicyClient(address) as client:
            assert client.upload_episode(bad).quarantined
        server.send_signal(stop)
        assert server.stdout.readline() == "policy server stopped\n"
        assert server.poll() is None
        texts = []

        def scraped_and_ended() -> bool:  # Prometheus's part: scrape every 0.2 s
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    texts.append(r.read().decode())
            except OSError:  # the endpoint is gone with the process
                pass
            return server.poll() is not None

        until(scraped_and_ended, "the gateway to end after a final scrape", timeout=12,
              poll=0.2)  # under the 15 s it would wait without one
        assert server.returncode == 0
        assert 'pacflow_policy_uploads_total{result="quarantined"} 2.0' in texts[-1]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_ending_process_waits_for_one_scrape_after_its_final_values(tmp_path):
    """ScrapeClock: a process Prometheus scrapes ends only after one more scrape, so the
    final counts are stored; a process nothing scrapes, or only the live progress (a scrape
    restricted to named metrics), or nothing for longer than the timeout, ends at once."""
    import threading
    import time

    from prometheus_client import Counter

    from cluster.progress import scrape as progress_scrape

    run = str(tmp_path / "run")
    registry = serve_metrics(run, "actor-0")
    address = read_targets(run)[0]["targets"][0]
    steps = Counter("pacflow_actor_episodes", "", registry=registry)
    assert progress_scrape(address)[("pacflow_actor_episodes_total", ())] == 0.0
    started = time.monotonic()
    assert registry.scrape_clock.final_scrape(30) is False  # no full scrape yet: no wait
    assert time.monotonic() - started < 5

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            return r.read().decode()

    assert "pacflow_actor_episodes_total 0.0" in scrape()
    steps.inc(4)  # the final value
    result = []
    waiter = threading.Thread(target=lambda: result.append(
        registry.scrape_clock.final_scrape(60)))
    waiter.start()
    texts = []
    while waiter.is_alive():  # Prometheus scraping until the process is done
        texts.append(scrape())
    assert result == [True]
    assert "pacflow_actor_episodes_total 4.0" in texts[-1]
    # Scraped just now but not again: it gives up after its timeout.
    started = time.monotonic()
    assert registry.scrape_clock.final_scrape(0.5) is False
    assert time.monotonic() - started >= 0.5
    # The last scrape is older than the timeout: no scraper at work, no wait.
    started = time.monotonic()
    assert registry.scrape_clock.final_scrape(0.2) is False
    assert time.monotonic() - started < 0.2


def test_the_final_scrape_counts_only_once_its_body_is_sent(tmp_path):
    """A scrape that has begun but whose body is still being made (a slow collector) is not
    the final one yet: a process that ended then would lose it (the run's end kills it)."""
    import threading

    from prometheus_client import Counter

    run = str(tmp_path / "run")
    registry = serve_metrics(run, "actor-0")
    address = read_targets(run)[0]["targets"][0]
    url = f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()  # a scraper is at work
    Counter("pacflow_actor_episodes", "", registry=registry).inc(24)  # the final value
    result, during = [], []
    waiter = threading.Thread(target=lambda: result.append(
        registry.scrape_clock.final_scrape(60)))
    waiter.start()

    class Slow:
        """Made after the clock noted the scrape's start: the final scrape must not have
        ended while it runs."""

        def collect(self):
            waiter.join(timeout=1.0)  # the old clock let it end here, within a second
            during.append(list(result))
            return []

    registry.register(Slow())
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    waiter.join(timeout=60)
    assert during == [[]]
    assert result == [True]
    assert "pacflow_actor_episodes_total 24.0" in text
