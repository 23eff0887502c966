"""Replay hardening: configured tables, fallback checkpoints, mismatches, stalls."""

import threading
import time
from pathlib import Path

import pytest

from replay.adders import ReverbSequenceAdder
from replay.config import RateLimiter, ReplayConfig, Sampler
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayCheckpointError, ReplayServer, clean_stale_checkpoints
from tests.fakes import SPEC, make_episode


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    config = ReplayConfig(n_step=1, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    adder = ReverbSequenceAdder(server.address, config)
    adder.add_episode(make_episode(length=3, seed=1))
    server.checkpoint()  # good: 3 items
    adder.add_episode(make_episode(length=4, seed=2))
    newest = server.checkpoint()  # 7 items; the 3-item one is kept as .previous
    server.stop()
    chunks = next(p for p in (tmp_path / "ckpt").rglob("chunks.tfrecord"))
    data = chunks.read_bytes()
    chunks.write_bytes(data[: len(data) // 2])
    restarted = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        assert restarted.num_items() == 3
        assert (tmp_path / "ckpt.corrupt" / Path(newest).name).exists()  # moved aside, kept
    finally:
        restarted.stop()


def test_a_checkpoint_without_its_manifest_is_damaged_and_leftovers_are_cleaned(tmp_path):
    """A crash between Reverb's DONE and pacflow's manifest leaves a checkpoint nothing vouches
    for (before, it counted as intact); a crash mid-checkpoint leaves folders that never load."""
    config = ReplayConfig(n_step=1, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    adder = ReverbSequenceAdder(server.address, config)
    adder.add_episode(make_episode(length=3, seed=1))
    server.checkpoint()  # 3 items
    adder.add_episode(make_episode(length=4, seed=2))
    newest = Path(server.checkpoint())  # 7 items; the 3-item one is kept as .previous
    server.stop()
    (newest / "pacflow_manifest.json").unlink()
    unfinished = tmp_path / "ckpt" / "9999-unfinished"
    unfinished.mkdir()
    (unfinished / "chunks.tfrecord").write_bytes(b"partial")
    stale_copy = tmp_path / "ckpt.previous.tmp"
    stale_copy.mkdir()
    restarted = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        assert restarted.num_items() == 3
        assert not unfinished.exists() and not stale_copy.exists()
    finally:
        restarted.stop()


def test_a_crash_between_dropping_and_renaming_the_previous_copy_keeps_it(tmp_path):
    config = ReplayConfig(n_step=1, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=3, seed=1))
    server.checkpoint()
    server.checkpoint()  # .previous now holds a 3-item copy
    server.stop()
    (tmp_path / "ckpt.previous").rename(tmp_path / "ckpt.previous.tmp")  # the crash window
    assert clean_stale_checkpoints(tmp_path / "ckpt", tmp_path / "ckpt.previous") == []
    assert any((tmp_path / "ckpt.previous").glob("*/DONE"))


def test_changed_table_config_is_refused_by_name(tmp_path):
    server = ReplayServer(SPEC, ReplayConfig(max_size=100), tmp_path / "ckpt")
    ReverbSequenceAdder(server.address, ReplayConfig(max_size=100)).add_episode(make_episode())
    server.checkpoint()
    server.stop()
    with pytest.raises(ReplayCheckpointError, match="max_size: checkpoint 100, config 50"):
        ReplayServer(SPEC, ReplayConfig(max_size=50), tmp_path / "ckpt")


def test_prioritized_sample_to_insert_table(tmp_path):
    config = ReplayConfig(sampler=Sampler.PRIORITIZED, rate_limiter=RateLimiter.SAMPLE_TO_INSERT,
                          samples_per_insert=2.0, error_buffer=50.0, min_size_to_sample=1)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=10))
        batch = next(ReverbBatchIterator(server.address, config, batch_size=4))
        assert batch.observation.shape == (4, 2, SPEC.obs_dim)
    finally:
        server.stop()


def test_empty_table_reports_a_stall_then_resumes_when_data_arrives(tmp_path):
    config = ReplayConfig(n_step=1, stall_timeout_seconds=0.5)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        batches = ReverbBatchIterator(server.address, config, batch_size=4)
        got = []
        reader = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while batches.num_stalls < 1 and time.monotonic() < deadline:
            reader.join(timeout=0.1)  # blocked: nothing to sample
        assert not got and batches.num_stalls >= 1
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=6))
        reader.join(timeout=30)
        assert got and got[0].observation.shape == (4, 2, SPEC.obs_dim)
        batches.close()
    finally:
        server.stop()


def test_interrupt_ends_a_next_blocked_on_an_empty_table(tmp_path):
    """The async loop's end: the learner waits for data that will not come until `interrupt`
    from another thread makes `next` raise StopIteration."""
    config = ReplayConfig(n_step=1)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        batches = ReverbBatchIterator(server.address, config, batch_size=4)
        outcome = []

        def read():
            try:
                next(batches)
                outcome.append("batch")
            except StopIteration:
                outcome.append("stopped")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not outcome  # blocked: nothing to sample
        batches.interrupt()
        reader.join(timeout=10)
        assert outcome == ["stopped"]
        with pytest.raises(StopIteration):
            next(batches)
        batches.close()
    finally:
        server.stop()


def test_a_sampling_error_is_raised_once_and_later_calls_sample_again(tmp_path, monkeypatch):
    """Before, the prefetch thread ended on its first error: the next call after the
    RuntimeError waited for ever on a thread that no longer existed."""
    from replay import dataset

    config = ReplayConfig(n_step=1, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    real, calls = dataset._batched_dataset, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("injected sampling error")
        return real(*args)
    monkeypatch.setattr(dataset, "_batched_dataset", flaky)
    try:
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=6))
        batches = ReverbBatchIterator(server.address, config, batch_size=4)
        with pytest.raises(RuntimeError, match="replay sampling failed"):
            next(batches)
        got = []
        reader = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert got and got[0].observation.shape == (4, 2, SPEC.obs_dim) and len(calls) == 2
        batches.close()
    finally:
        server.stop()


def test_the_learners_stall_gauge_moves_while_train_waits(tmp_path):
    """Before, the gauge was set when train() returned: a learner starved for good showed no
    stall at all."""
    from cluster.workers import LearnerWorker
    from learners.config import LearnerConfig
    from tests.fakes import TINY_MODEL

    config = ReplayConfig(n_step=1, stall_timeout_seconds=0.5)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        worker = LearnerWorker(SPEC, TINY_MODEL, LearnerConfig(batch_size=4), config,
                               server.address, str(tmp_path / "run"), 0)
        stalls = lambda: worker.registry.get_sample_value("pacflow_learner_replay_stalls_total")  # noqa: E731
        trainer = threading.Thread(target=worker.train, args=(1,), daemon=True)
        trainer.start()
        waited = lambda: worker.registry.get_sample_value(  # noqa: E731
            "pacflow_learner_data_wait_seconds_total")
        # The sampler's first stall can come before train() builds its model and starts to
        # wait (a cold import): poll for both, each while train() has not returned.
        deadline = time.monotonic() + 60
        while not (stalls() and waited() >= 0.5) and time.monotonic() < deadline:
            trainer.join(timeout=0.1)
        assert stalls() >= 1 and trainer.is_alive()  # shown while train() still waits
        assert waited() >= 0.5  # the wait in progress counts too (PacflowLearnerStarved)
        assert trainer.is_alive()
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=6))
        trainer.join(timeout=60)
        assert not trainer.is_alive()
    finally:
        server.stop()
