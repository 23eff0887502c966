"""cluster/report_data.py and the page of cluster/html_report.py on hand-made run folders."""

import json
import os

import numpy as np
import pytest

from cluster.html_report import render, write_html_report
from cluster.report import CycleRow, write_state
from cluster.report_data import (HISTORY_DIR, EpisodeSummary, gather, quarantine_counts,
                                 read_learner_history, return_spread, row_of, version_lineage,
                                 versions_behind)
from policies.snapshot import Snapshot, save_snapshot
from replay.archive import EpisodeArchive
from replay.spec import Episode, Lineage
from replay.storage import Storage


def _row(cycle, version, env_steps, seconds=10.0):
    return CycleRow(cycle=cycle, env_steps=env_steps, episodes=0, collect_return=0.0,
                    eval_return=None, learner_steps=10 * (cycle + 1), policy_version=version,
                    seconds=seconds)


def _summary(mode, cycle, version, ret=0.0, end=0.0, length=10, actor="actor-0", eid=None):
    return EpisodeSummary(eid or f"{mode}{cycle}{version}{ret}", mode, cycle, "t", actor,
                          version, length, ret, end)


def _episode(mode, cycle, version, rewards, end_time):
    n = len(rewards) + 1
    lineage = Lineage(run_id="run", cycle=cycle, policy_version=version, actor_id="actor-0",
                      task="dm_control:cartpole-swingup", episode_id=os.urandom(16).hex(),
                      seed=0, mode=mode, start_time=end_time - 1, end_time=end_time)
    return Episode(lineage=lineage, task_id=0, observation=np.zeros((n, 3), np.float32),
                   action=np.zeros((n, 1), np.float32),
                   reward=np.array([*rewards, 0.0], np.float32),
                   discount=np.ones(n, np.float32), policy_version=np.full(n, version, np.int64),
                   terminated=False, truncated=True)


def test_learner_history_merges_files_in_step_order_and_the_later_write_wins(tmp_path):
    folder = tmp_path / HISTORY_DIR
    folder.mkdir(parents=True)
    (folder / "000000000000.jsonl").write_text(
        json.dumps({"learner_steps": 10, "time": 1.0, "loss": 3.0}) + "\n"
        + json.dumps({"learner_steps": 20, "time": 2.0, "loss": 2.0}) + "\n")
    # A restarted learner wrote step 20 again later, then died mid-line.
    (folder / "000000000020.jsonl").write_text(
        json.dumps({"learner_steps": 20, "time": 5.0, "loss": 9.0}) + "\n"
        + json.dumps({"learner_steps": 30, "time": 6.0, "loss": 1.0}) + "\n{\"learner_st")
    (folder / "notes.txt").write_text("not history")
    history, skipped = read_learner_history(Storage(folder))
    assert [(h["learner_steps"], h["loss"]) for h in history] == [(10, 3.0), (20, 9.0), (30, 1.0)]
    assert skipped == 1


def test_episodes_count_in_their_cycle_row_or_by_version_in_async_runs():
    rows = [_row(0, 1, 100), _row(1, 2, 200), _row(2, 3, 300)]
    assert row_of(_summary("collect", 1, 1), rows, "cycles") == 1
    assert row_of(_summary("collect", 5, 1), rows, "cycles") is None  # after the last row
    # async: collected with v1 -> the row that published v2; evaluated v2 -> v2's row
    assert row_of(_summary("collect", 0, 0), rows, "async") == 0
    assert row_of(_summary("collect", 7, 1), rows, "async") == 1
    assert row_of(_summary("eval", 0, 2), rows, "async") == 1
    assert row_of(_summary("collect", 0, 3), rows, "async") is None
    spread = return_spread([_summary("collect", 0, 0, r) for r in (1.0, 2.0, 3.0, 10.0)]
                           + [_summary("eval", 0, 1, 5.0)], rows, "cycles")
    assert [(s.mode, s.row, s.count, s.mean, s.low, s.high) for s in spread] == [
        ("collect", 0, 4, 4.0, 1.0, 10.0), ("eval", 0, 1, 5.0, 5.0, 5.0)]
    assert spread[0].q25 == pytest.approx(1.75) and spread[0].q75 == pytest.approx(4.75)


def test_versions_behind_counts_versions_published_before_the_episode_ended():
    snapshots = [{"version": 1, "published": 100.0}, {"version": 2, "published": 200.0},
                 {"version": 3, "published": None}]
    episodes = [_summary("collect", 0, 0, end=50.0, eid="a"),
                _summary("collect", 0, 0, end=250.0, eid="b"),
                _summary("collect", 0, 1, end=150.0, eid="c"),
                _summary("eval", 0, 0, end=250.0, eid="d")]
    assert versions_behind(episodes, snapshots) == {"a": 0, "b": 2, "c": 0}


def test_quarantine_counts_by_the_first_reasons_subject():
    records = [{"reasons": ["observation: NaN at step 3"]},
               {"reasons": ["observation: Inf at step 1", "reward: NaN"]},
               {"reasons": ["reward: NaN"]}, {}]
    assert [(r, n) for r, n, _ in quarantine_counts(records)] == [
        ("observation", 2), ("(no reason recorded)", 1), ("reward", 1)]


def _hand_made_run(run: str) -> None:
    """Two cycles (action repeat 4): two collected episodes each, one evaluation of v1, two
    snapshots, one quarantined episode; no learner history."""
    store = Storage(run)
    store.put_bytes("config.yaml", b"env:\n  action_repeat: 4\n")
    write_state(run, [_row(0, 1, 80), _row(1, 2, 160)],
                {"mode": "cycles", "last_train_metrics": {"loss": 1.5}})
    archive = EpisodeArchive(store.child("archive").uri)
    for cycle, version in ((0, 0), (1, 1)):
        for r in (1.0, 3.0):
            archive.write(_episode("collect", cycle, version, [r] * 10, 10.0 + cycle))
    archive.write(_episode("eval", 0, 1, [2.0] * 10, 11.0))
    for v in (1, 2):
        save_snapshot(Snapshot(v, {"cycle": v - 1, "learner_step": 10 * v, "parent_version":
                                   v - 1, "env_spec": {}, "trained_on": {"episodes": 3}},
                               b"w"), store.child("policies").uri)
    store.put_bytes("quarantine/x.reason.json", b'{"reasons": ["reward: NaN"]}')


def test_a_hand_made_run_gathers_episodes_versions_and_lineage(tmp_path):
    run = str(tmp_path)
    _hand_made_run(run)
    data = gather(run)
    assert data.missing == {HISTORY_DIR: "no learner history files (*.jsonl) in this run"}
    assert data.action_repeat == 4 and len(data.episodes) == 5 and len(data.quarantine) == 1
    assert sorted(e.episode_return for e in data.episodes) == [10.0, 10.0, 20.0, 30.0, 30.0]
    lineage = version_lineage(data.snapshots, data.episodes, data.action_repeat)
    assert [(v["version"], v["collect_episodes"], v["eval_episodes"], v["eval_return"],
             v["earlier_episodes"], v["earlier_env_steps"]) for v in lineage] == [
        (1, 2, 1, 20.0, 2, 80), (2, 0, 0, None, 4, 160)]
    assert lineage[1]["origin"] == {"trained_on": {"episodes": 3}}
    page = render(data)
    assert 'id="fig-returns"' in page and 'id="fig-throughput"' in page
    assert "fig-learner" not in page and f'data-source="{HISTORY_DIR}"' in page
    assert "<td>loss</td><td>1.5</td>" in page  # the last train call's, instead
    assert "<td class=text>reward</td><td>1</td>" in page


def test_a_run_with_only_cycle_json_says_what_is_missing(tmp_path):
    write_state(str(tmp_path), [_row(0, 1, 80)], {})
    path = write_html_report(str(tmp_path))
    page = open(path).read()
    for source in ("archive", HISTORY_DIR, "policies", "config.yaml"):
        assert f'data-source="{source}"' in page, source
    assert "Nothing to plot: no archived episodes" in page
    assert '<td data-key="env_steps">80</td>' in page


def test_the_page_of_a_run_on_an_object_store_is_written_there(s3_prefix):
    prefix, _ = s3_prefix
    run = f"{prefix}/run"
    _hand_made_run(run)
    assert write_html_report(run) == f"{run}/report/index.html"
    page = Storage(run).get_bytes("report/index.html").decode()
    assert '<td data-key="archived_collect_episodes">4</td>' in page
    assert '<td data-key="published_versions">2</td>' in page
    assert 'id="fig-returns"' in page and "<td class=text>reward</td><td>1</td>" in page
