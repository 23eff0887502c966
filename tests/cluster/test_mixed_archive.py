"""The mixed-archive builder's behaviour policy: decisions held for `hold` steps, noise mixed in."""

import numpy as np

from cluster.mixed_archive import HeldNoisyPolicy
from policies.policy import RandomPolicy
from tests.fakes import SPEC


class CountingPolicy:
    policy_version = 4

    def __init__(self):
        self.calls = 0

    def act(self, observation, task_id, greedy, pixels=None):
        self.calls += 1
        return np.full((len(observation), SPEC.action_dim), 0.5 * (self.calls % 2), np.float32)


def test_decisions_are_held_and_noise_replaces_some():
    inner = CountingPolicy()
    random = RandomPolicy(SPEC, 5, seed=0)
    held = HeldNoisyPolicy(inner, random, hold=4, noise=0.0, seed=0)
    obs, task = np.zeros((3, SPEC.obs_dim), np.float32), np.zeros(3, np.int64)
    actions = [held.act(obs, task, False) for _ in range(12)]
    assert inner.calls == 3 and held.policy_version == 4
    for start in (0, 4, 8):
        assert all(np.array_equal(actions[start], a) for a in actions[start:start + 4])
    assert not np.array_equal(actions[0], actions[4])
    noisy = HeldNoisyPolicy(CountingPolicy(), random, hold=1, noise=1.0, seed=0)
    a = np.stack([noisy.act(obs, task, False) for _ in range(20)])
    assert len(np.unique(a)) > 2  # uniformly random bins, not the inner policy's 0 or 0.5
