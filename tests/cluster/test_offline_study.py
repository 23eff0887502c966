"""The offline study's pieces: the below-median filter and the MLP behaviour-cloning reference."""

import dataclasses

import numpy as np
import torch

from cluster.offline import select_episodes
from cluster.sweep import below_median_filter
from learners.reference import MLPPolicy, train_mlp_bc
from replay.archive import EpisodeArchive
from tests.fakes import make_episode


def test_below_median_filter_keeps_the_lower_half(tmp_path):
    archive = EpisodeArchive(tmp_path / "archive")
    returns = {}
    for seed, scale in enumerate([0.1, 1.0, 3.0, 10.0]):
        ep = make_episode(length=5, seed=seed)
        ep = dataclasses.replace(ep, reward=ep.reward * scale)
        archive.write(ep)
        returns[ep.lineage.episode_id] = ep.episode_return
    where = below_median_filter(str(tmp_path / "archive"))
    kept = select_episodes(archive, where).episode_ids
    assert sorted(kept) == sorted(sorted(returns, key=returns.get)[:2])


def test_mlp_reference_learns_a_state_to_bin_mapping():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2000, 3)).astype(np.float32) * [1.0, 50.0, 0.1]
    bins = np.stack([(obs[:, 0] > 0) * 4, (obs[:, 1] > 0) * 2], axis=1)  # (N, A=2), K=5
    model = train_mlp_bc(obs, bins, num_bins=5, steps=300, batch_size=64, learning_rate=3e-3)
    policy = MLPPolicy(model, np.linspace(-1, 1, 5))
    actions = policy.act(obs[:200], np.zeros(200, np.int64), greedy=True)  # bin centres
    expected = np.linspace(-1, 1, 5)[bins[:200]]
    assert (actions == expected).mean() > 0.9
    assert torch.isfinite(model.std).all() and model.std[1] > 10  # standardised inputs
