"""Camera images through the data plane (adder -> Reverb -> batches, archive, validation) and
per-item priorities."""

import dataclasses

import numpy as np
import pytest
import reverb
import torch

from replay.adders import ReverbSequenceAdder, check_priorities
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig, Sampler
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from replay.validation import episode_problems
from tests.fakes import PIXEL_SPEC, SPEC, make_episode


def test_pixel_items_come_back_as_uint8_batches(tmp_path):
    config = ReplayConfig(n_step=2, timeout_seconds=10)
    server = ReplayServer(PIXEL_SPEC, config, tmp_path / "ckpt")
    try:
        episode = make_episode(length=5, spec=PIXEL_SPEC, seed=3)
        assert ReverbSequenceAdder(server.address, config).add_episode(episode) == 5
        batch = next(ReverbBatchIterator(server.address, config, batch_size=4))
        assert batch.pixels.shape == (4, 3, 16, 16, 3) and batch.pixels.dtype == torch.uint8
        frames = {f.numpy().tobytes() for f in batch.pixels.reshape(-1, 16, 16, 3)}
        assert frames <= {f.tobytes() for f in episode.pixels}  # every frame is the episode's
    finally:
        server.stop()


def test_archive_round_trips_pixels_and_reads_camera_less_episodes(tmp_path):
    archive = EpisodeArchive(tmp_path / "archive")
    with_camera, without = make_episode(spec=PIXEL_SPEC, seed=1), make_episode(seed=2)
    archive.write(with_camera)
    archive.write(without)
    back = {e.lineage.episode_id: e for e in archive.episodes()}
    np.testing.assert_array_equal(back[with_camera.lineage.episode_id].pixels, with_camera.pixels)
    assert back[without.lineage.episode_id].pixels is None


def test_validation_names_pixel_problems():
    good = make_episode(spec=PIXEL_SPEC)
    assert episode_problems(good, PIXEL_SPEC) == []
    assert episode_problems(dataclasses.replace(good, pixels=None), PIXEL_SPEC) == \
        ["pixels: missing"]
    wrong = dataclasses.replace(good, pixels=good.pixels.astype(np.float32))
    assert episode_problems(wrong, PIXEL_SPEC) == ["pixels: dtype float32, expected uint8"]
    assert episode_problems(good, SPEC) == ["pixels: present, but the environment spec has no "
                                            "camera"]


def test_priorities_are_written_per_item(tmp_path):
    config = ReplayConfig(n_step=1, sampler=Sampler.PRIORITIZED, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        episode = make_episode(length=4)
        ReverbSequenceAdder(server.address, config).add_episode(
            episode, priorities=np.array([1.0, 2.0, 3.0, 4.0]))
        samples = reverb.Client(server.address).sample(
            config.table, num_samples=200, emit_timesteps=False, unpack_as_table_signature=True)
        by_priority = {float(s.info.priority): s.data for s in samples}
        assert set(by_priority) == {1.0, 2.0, 3.0, 4.0}
        for p, data in by_priority.items():  # priority k belongs to the item starting at k-1
            np.testing.assert_array_equal(data["observation"][0], episode.observation[int(p) - 1])
    finally:
        server.stop()


def test_bad_priorities_are_refused_before_anything_is_written():
    with pytest.raises(ValueError, match="4 finite positive numbers"):
        check_priorities(np.array([1.0, 0.0, 1.0, 1.0]), 4)
    with pytest.raises(ValueError, match="got shape \\(3,\\)"):
        check_priorities(np.ones(3), 4)
