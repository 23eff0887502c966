"""The metric list, the dashboard and the alert rules agree; persistent counters survive a new
process; the learner's windows and history."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metric_catalog import METRICS, helps
from cluster.metrics import LearnerMetrics, PersistentCounters

ROOT = Path(__file__).resolve().parents[2]
NAMES = {name for name, *_ in METRICS}
HISTOGRAMS = {name for name, kind, *_ in METRICS if kind == "histogram"}


def used_metrics(expr: str) -> set[str]:
    """pacflow metric names an expression reads, histogram series mapped to their base name."""
    names = set(re.findall(r"pacflow_[a-z_]+", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(r"_(bucket|sum|count)$", "", n)
            in HISTOGRAMS else n for n in names}


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "deploy/grafana/pacflow.json").read_text())
    return [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_names_follow_the_conventions():
    for name, kind, _, text in METRICS:
        assert name.startswith("pacflow_") and text, name
        assert name.endswith("_total") == (kind == "counter"), name
        assert not re.search(r"_(ms|milliseconds|minutes|bytes_total)$", name), name


def test_every_dashboard_panel_and_alert_uses_listed_metrics_only():
    exprs = dashboard_exprs()
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*map(used_metrics, exprs))
    assert used - NAMES == set()
    # and every listed metric is on the dashboard
    assert NAMES - used == set()


def test_the_docs_list_every_metric():
    docs = (ROOT / "docs/operations.md").read_text()
    missing = [name for name in NAMES if f"`{name}" not in docs]
    assert missing == []


def test_promtool_accepts_the_alert_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs Debian's prometheus package"
    rules = str(ROOT / "deploy/prometheus/alerts.yml")
    result = subprocess.run([promtool, "check", "rules", rules], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def _scrape(registry: CollectorRegistry) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_persistent_counters_continue_in_the_next_incarnation(tmp_path):
    run = str(tmp_path / "run")
    first, registry = PersistentCounters(run, "actor-0", helps("actor")), CollectorRegistry()
    registry.register(first)
    steps = ("pacflow_actor_env_steps", (("task", "t"),))
    ret = ("pacflow_actor_episode_return", (("mode", "collect"), ("task", "t")))
    first.add({steps: 500}, {ret: [5.0, 150.0]})
    first.add({steps: 250}, {ret: [2000.0]})
    before = _scrape(registry)
    assert before[("pacflow_actor_env_steps_total", (("task", "t"),))] == 750
    labels = (("le", "10.0"), ("mode", "collect"), ("task", "t"))
    assert before[("pacflow_actor_episode_return_bucket", labels)] == 1
    assert before[("pacflow_actor_episode_return_bucket",
                   (("le", "+Inf"), ("mode", "collect"), ("task", "t")))] == 3
    assert before[("pacflow_actor_episode_return_sum", (("mode", "collect"), ("task", "t")))] \
        == 2155.0
    # A new process (Ray's restart runs the constructor again) exports the same values.
    again = CollectorRegistry()
    again.register(PersistentCounters(run, "actor-0", helps("actor")))
    assert _scrape(again) == before


def test_learner_windows_and_history(tmp_path):
    registry = CollectorRegistry()
    metrics = LearnerMetrics(registry, str(tmp_path), window=4)
    metrics.start(first_step=10)
    for i in range(1, 11):
        metrics.on_update(10 + i, {"loss": float(i), "l_q": 1.0, "temperature": 0.5,
                                   "data_wait_s": 0.01, "step_s": 0.04, "q_mean": 2.0})
        if i == 4:  # the first window is exported as soon as it closes
            assert _scrape(registry)[("pacflow_learner_loss", (("term", "loss"),))] == 2.5
    metrics.finish(20)
    with metrics.waiting:  # a wait in progress counts while it lasts
        assert _scrape(registry)[("pacflow_learner_data_wait_seconds_total", ())] > 0
    values = _scrape(registry)
    assert values[("pacflow_learner_updates_total", ())] == 10
    assert values[("pacflow_learner_data_wait_fraction", ())] == pytest.approx(0.25)
    lines = (tmp_path / "metrics/history/learner/0000000010.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["learner_steps"] for r in rows] == [14, 18, 20]
    assert [r["loss"] for r in rows] == [2.5, 6.5, 9.5]
    assert all(r["updates_per_second"] > 0 for r in rows)
