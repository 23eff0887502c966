"""Reverb items written by the sequence adder for known short episodes (real Reverb server)."""

import numpy as np
import pytest

from replay.adders import ReverbSequenceAdder
from replay.config import ReplayConfig
from replay.server import ReplayServer, episode_key, sample_items
from tests.fakes import SPEC, make_episode


@pytest.fixture()
def server(tmp_path):
    config = ReplayConfig(n_step=2, timeout_seconds=10)
    srv = ReplayServer(SPEC, config, tmp_path / "ckpt")
    yield srv, config
    srv.stop()


def _all_items(address, config, expected):
    """Samples until all `expected` distinct items are seen; keyed by (episode_key, first obs)."""
    seen = {}
    for _ in range(50):
        items = sample_items(address, config.table, 64)
        for i in range(64):
            seen[(int(items["episode_key"][i, 0]), items["observation"][i, 0].tobytes())] = \
                {k: v[i] for k, v in items.items()}
        if len(seen) == expected:
            return seen
    raise AssertionError(f"saw {len(seen)} distinct items, expected {expected}")


def test_items_of_a_truncated_episode(server):
    srv, config = server
    ep = make_episode(length=4, version=3)
    assert ReverbSequenceAdder(srv.address, config).add_episode(ep) == 4
    assert srv.num_items() == 4
    items = _all_items(srv.address, config, 4)
    key = episode_key(ep.lineage.episode_id)
    for start in range(4):
        item = items[(key, ep.observation[start].tobytes())]
        rows = [min(start + j, 4) for j in range(3)]  # padding repeats the final record
        np.testing.assert_array_equal(item["observation"], ep.observation[rows])
        assert item["policy_version"].tolist() == [3, 3, 3]
        assert item["task_id"].tolist() == [0, 0, 0]
        expected_mask = [1.0 if start + j < 4 else 0.0 for j in range(3)]
        assert item["mask"].tolist() == expected_mask
        for j in range(3):
            if start + j < 4:
                np.testing.assert_array_equal(item["action"][j], ep.action[start + j])
                assert item["reward"][j] == ep.reward[start + j]
                assert item["discount"][j] == ep.discount[start + j]
            else:  # the final record and padding carry no action, reward or discount
                assert not item["action"][j].any() and item["reward"][j] == 0
    # The last item starts at the last transition and ends in the final observation.
    last = items[(key, ep.observation[3].tobytes())]
    assert last["discount"][0] == 1.0  # truncation: bootstrap from the final observation


def test_terminated_episode_has_zero_discount_on_the_last_transition(server):
    srv, config = server
    ep = make_episode(length=3, terminated=True, seed=1)
    ReverbSequenceAdder(srv.address, config).add_episode(ep)
    items = _all_items(srv.address, config, 3)
    last = items[(episode_key(ep.lineage.episode_id), ep.observation[2].tobytes())]
    assert last["discount"].tolist() == [0.0, 0.0, 0.0]
    assert last["mask"].tolist() == [1.0, 0.0, 0.0]


def test_restart_restores_items_from_the_checkpoint(tmp_path):
    config = ReplayConfig(n_step=2, timeout_seconds=10)
    srv = ReplayServer(SPEC, config, tmp_path / "ckpt")
    ReverbSequenceAdder(srv.address, config).add_episode(make_episode(length=5))
    srv.checkpoint()
    srv.stop()
    restarted = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        assert restarted.num_items() == 5
    finally:
        restarted.stop()
