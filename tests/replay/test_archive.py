"""The Parquet episode archive: round trip, idempotence, verify."""

import numpy as np

from cluster.cli import main
from replay.archive import EpisodeArchive
from tests.fakes import make_episode


def test_round_trip_keeps_every_field(tmp_path):
    archive = EpisodeArchive(tmp_path / "archive")
    ep = make_episode(length=6, version=2, terminated=True)
    assert archive.write(ep)
    (back,) = list(archive.episodes())
    assert back.lineage == ep.lineage
    for name in ("observation", "action", "reward", "discount", "policy_version"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
        assert getattr(back, name).dtype == getattr(ep, name).dtype
    assert (back.terminated, back.truncated, back.task_id) == (True, False, 0)


def test_rewriting_an_episode_is_a_no_op(tmp_path):
    archive = EpisodeArchive(tmp_path)
    ep = make_episode()
    assert archive.write(ep) is True
    assert archive.write(ep) is False
    assert len(archive.paths()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_verify_names_a_truncated_file(tmp_path, capsys):
    archive = EpisodeArchive(tmp_path)
    good, bad = make_episode(seed=1), make_episode(seed=2)
    archive.write(good)
    archive.write(bad)
    path = archive.path_of(bad.lineage.episode_id)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    count, problems = archive.verify()
    assert count == 1 and [p for p, _ in problems] == [path]

    assert main(["archive", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 episodes readable" in out and f"unreadable: {path}" in out


def test_stats_and_export(tmp_path, capsys):
    import pyarrow.dataset as ds

    archive = EpisodeArchive(tmp_path / "archive")
    for seed, (cycle, version) in enumerate([(0, 0), (0, 0), (1, 1)]):
        archive.write(make_episode(length=3 + seed, version=version, cycle=cycle, seed=seed))
    assert main(["archive", "stats", str(tmp_path / "archive")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 episodes, 12 transitions"
    rows = [line.split() for line in out[2:]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        ("collect", "0", "0", "2", "7"), ("collect", "1", "1", "1", "5")]

    assert main(["archive", "export", str(tmp_path / "archive"), str(tmp_path / "out")]) == 0
    table = ds.dataset(tmp_path / "out").to_table()
    assert table.num_rows == 3 + 4 + 5 + 3  # T+1 rows per episode
    assert set(table.column("episode_id").to_pylist()) == \
        {p.split("/")[-1][:-8] for p in archive.paths()}


def test_a_local_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                               monkeypatch):
    """Before, the archive renamed a file it never fsynced: a power loss could leave an empty
    or partial episode under its final name."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))),
                                                     real_replace(a, b))[1])
    archive = EpisodeArchive(tmp_path / "archive")
    events.clear()
    episode = make_episode()
    assert archive.write(episode)
    target = archive.path_of(episode.lineage.episode_id)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[1][1] == target
    assert events[2][1] == str(tmp_path / "archive")
