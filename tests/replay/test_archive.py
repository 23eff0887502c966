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
