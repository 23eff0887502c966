"""Bad episodes go to quarantine with a reason; good ones reach the archive and replay."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from replay.archive import EpisodeArchive
from replay.ingest import EpisodeSink
from replay.spec import Adder
from replay.validation import episode_problems
from tests.fakes import SPEC, make_episode


class RecordingAdder(Adder):
    def __init__(self):
        self.episodes = []

    def add_episode(self, episode):
        self.episodes.append(episode.lineage.episode_id)
        return episode.length


def test_good_episode_has_no_problems():
    assert episode_problems(make_episode(), SPEC) == []


def test_each_defect_is_named():
    ep = make_episode(length=3)
    obs = ep.observation.copy()
    obs[1, 0] = np.nan
    cases = {
        "observation: non-finite": dataclasses.replace(ep, observation=obs),
        "action: shape": dataclasses.replace(ep, action=ep.action[:, :1]),
        "reward: dtype": dataclasses.replace(ep, reward=ep.reward.astype(np.float64)),
        "task_id": dataclasses.replace(ep, task_id=5),
        "exactly one of terminated/truncated": dataclasses.replace(ep, terminated=True),
    }
    for expected, bad in cases.items():
        problems = episode_problems(bad, SPEC)
        assert any(p.startswith(expected) for p in problems), (expected, problems)


def test_sink_quarantines_bad_and_keeps_good(tmp_path):
    adder = RecordingAdder()
    archive = EpisodeArchive(tmp_path / "archive")
    sink = EpisodeSink(SPEC, archive, adder, tmp_path / "quarantine")
    good = make_episode(seed=1)
    obs = good.observation.copy()
    obs[0, 0] = np.inf
    bad = dataclasses.replace(make_episode(seed=2), observation=obs)
    assert sink.write(good, to_replay=True) is True
    assert sink.write(bad, to_replay=True) is False
    assert adder.episodes == [good.lineage.episode_id]
    assert [p.split("/")[-1] for p in archive.paths()] == [f"{good.lineage.episode_id}.parquet"]
    reason = json.loads((tmp_path / "quarantine" / f"{bad.lineage.episode_id}.reason.json")
                        .read_text())
    assert reason["reasons"] == ["observation: non-finite values"]
    assert (tmp_path / "quarantine" / f"{bad.lineage.episode_id}.parquet").exists()
    assert sink.rejected == {"observation": 1}


def test_unstorable_episode_still_gets_its_reason_file(tmp_path):
    from replay.validation import quarantine

    ep = make_episode(length=2)
    bad = dataclasses.replace(ep, observation=np.zeros((3, 2, 3), np.float32))  # not a table row
    problems = episode_problems(bad, SPEC)
    path = quarantine(bad, problems, tmp_path)
    record = json.loads(Path(path).read_text())
    assert record["reasons"] == problems and record["actor_id"] == "actor-0"
    assert "unstorable" in record
