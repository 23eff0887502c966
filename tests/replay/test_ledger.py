"""Replay written by its own process (#11 items 5 and 6): idempotent by episode id, checkpoints
that name the whole episodes they hold, and reconciliation with the archive after a crash."""

import dataclasses
from pathlib import Path

import pytest

from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.ingest import EpisodeSink
from replay.ledger import LEDGER, Ledger
from replay.server import PartialEpisodeError, ReplayServer
from replay.spec import Adder
from tests.fakes import SPEC, make_episode

CONFIG = ReplayConfig(n_step=2, timeout_seconds=10)


class ServerAdder(Adder):
    """The in-process form of the run's ReplayActorAdder: ReplayServer.ingest."""

    idempotent = True

    def __init__(self, server: ReplayServer, fail_once: bool = False):
        self.server, self.fail_once = server, fail_once

    def add_episode(self, episode, priorities=None):
        if self.fail_once:  # a failure between the archive write and the replay write
            self.fail_once = False
            raise ConnectionError("replay unreachable")
        return self.server.ingest(episode)

    def holds(self, episode_id):
        return self.server.holds(episode_id)


def _episodes(n: int, mode: str = "collect", first_seed: int = 0):
    return [make_episode(length=3 + i, seed=first_seed + i, mode=mode) for i in range(n)]


def test_ingest_is_idempotent_by_episode_id(tmp_path):
    server = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    try:
        episode = _episodes(1)[0]
        assert server.ingest(episode) == episode.length
        assert server.ingest(episode) == 0
        assert server.num_items() == episode.length and server.holds(episode.lineage.episode_id)
    finally:
        server.stop()


def test_a_write_cut_short_refuses_later_writes_and_checkpoints(tmp_path, monkeypatch):
    """Part of the episode may be in the table: nothing more goes in or out to a checkpoint
    (the run's replay process exits instead: tests/reliability, S2)."""
    import reverb

    server = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    first, second = _episodes(2, first_seed=5)
    # The adder calls Reverb's C++ writer (pybind) directly: fail its third CreateItem.
    create_item, calls = reverb.pybind.TrajectoryWriter.CreateItem, []

    def third_fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return create_item(self, *args, **kwargs)

    monkeypatch.setattr(reverb.pybind.TrajectoryWriter, "CreateItem", third_fails)
    try:
        with pytest.raises(PartialEpisodeError, match=f"{first.lineage.episode_id} was cut short"):
            server.ingest(first)
        assert not server.holds(first.lineage.episode_id)
        with pytest.raises(PartialEpisodeError):
            server.ingest(second)
        with pytest.raises(PartialEpisodeError):
            server.checkpoint()
        assert not list((tmp_path / "ckpt").glob("*/DONE")) and len(calls) == 3
    finally:
        server.stop()


def test_a_checkpoint_names_its_episodes_and_a_restart_keeps_them(tmp_path):
    server = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    first, second = _episodes(2)
    server.ingest(first)
    path = server.checkpoint()
    server.ingest(second)  # after the checkpoint: lost when the server dies
    server.stop()
    saved = Ledger.load(Path(path))
    assert saved is not None and first.lineage.episode_id in saved and len(saved) == 1
    assert (Path(path) / LEDGER).exists()
    restarted = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    try:
        assert restarted.num_items() == first.length
        assert restarted.holds(first.lineage.episode_id)
        assert not restarted.holds(second.lineage.episode_id)
        assert restarted.ingest(first) == 0 and restarted.ingest(second) == second.length
    finally:
        restarted.stop()


def test_reconcile_writes_what_the_archive_has_and_replay_lost(tmp_path):
    """The archive is written first; a replay that died after its checkpoint has lost what came
    later. Restarted, it writes those episodes again from the archive, once, and never the
    evaluation episodes (archived, not trained on)."""
    archive = EpisodeArchive(tmp_path / "archive")
    server = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    sink = EpisodeSink(SPEC, archive, ServerAdder(server), tmp_path / "quarantine")
    collect, evals = _episodes(4), _episodes(2, mode="eval", first_seed=10)
    for episode in collect[:2]:
        assert sink.write(episode, to_replay=True)
    server.checkpoint()
    for episode in collect[2:]:
        assert sink.write(episode, to_replay=True)
    for episode in evals:
        assert sink.write(episode, to_replay=False)
    server.stop()  # dies: collect[2:] were archived after the checkpoint
    restarted = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    try:
        assert restarted.num_items() == sum(e.length for e in collect[:2])
        assert restarted.reconcile(archive) == 2
        assert restarted.reconcile(archive) == 0  # converged: nothing more to write
        assert restarted.num_items() == sum(e.length for e in collect)
        assert restarted.rate_stats()["episodes"] == len(collect)
    finally:
        restarted.stop()


def test_a_retry_of_an_archived_episode_still_reaches_replay(tmp_path):
    """Before, a failure between the two writes made every retry a "duplicate" that never
    reached replay."""
    archive = EpisodeArchive(tmp_path / "archive")
    server = ReplayServer(SPEC, CONFIG, tmp_path / "ckpt")
    sink = EpisodeSink(SPEC, archive, ServerAdder(server, fail_once=True),
                       tmp_path / "quarantine")
    try:
        episode = _episodes(1)[0]
        with pytest.raises(ConnectionError):
            sink.write(episode, to_replay=True)
        assert len(archive.paths()) == 1 and server.num_items() == 0
        retry = sink.ingest(dataclasses.replace(episode), to_replay=True)
        assert retry.duplicate and server.num_items() == episode.length
        again = sink.ingest(episode, to_replay=True)  # and a further repeat writes nothing
        assert again.duplicate and server.num_items() == episode.length
    finally:
        server.stop()
