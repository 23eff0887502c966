"""One model over tasks of different observation and action sizes, trained on mixed batches."""

import itertools

import numpy as np
import torch

from actors.envs import make_env_spec, make_environment
from actors.loop import EnvironmentLoop, EpisodeContext
from learners import losses
from learners.config import LearnerConfig
from learners.learner import PACLearner
from policies.perceiver import PerceiverActorCritic
from replay.adders import episode_records
from replay.dataset import stack_batch
from tests.fakes import TINY_MODEL

TASKS = ["dm_control:cartpole-swingup", "dm_control:point_mass-easy"]  # obs 5/4, actions 1/2


class ThresholdPolicy:
    """A learnable behaviour: each action dimension's sign follows one observation's sign."""

    policy_version = 0

    def act(self, observation, task_id, greedy, pixels=None):
        return np.where(observation[:, :2] > 0, 0.5, -0.5).astype(np.float32)


def test_padding_is_invisible_to_the_network():
    spec = make_env_spec(TASKS)
    assert (spec.obs_dim, spec.action_dim) == (5, 2)
    torch.manual_seed(0)
    model = PerceiverActorCritic(spec, TINY_MODEL).eval()
    obs = torch.randn(3, spec.obs_dim)
    task = torch.ones(3, dtype=torch.long)  # point_mass: 4 observations, 2 actions
    noisy = obs.clone()
    noisy[:, 4] = 100.0  # the padded position
    torch.testing.assert_close(model.encode(obs, task), model.encode(noisy, task))
    z = model.encode(obs, torch.zeros(3, dtype=torch.long))  # cartpole: 1 action dimension
    bins = torch.randint(0, TINY_MODEL.num_action_bins, (3, 4, 2))
    other = bins.clone()
    other[..., 1] = (other[..., 1] + 1) % TINY_MODEL.num_action_bins
    mask = model.action_mask(torch.zeros(3, dtype=torch.long))
    assert mask.tolist() == [[1.0, 0.0]] * 3
    torch.testing.assert_close(model.q_logits(z, bins, mask), model.q_logits(z, other, mask))


def _items(spec, task_id, n_episodes):
    task = spec.tasks[task_id].name
    envs = [make_environment(task, seed=i, action_repeat=8) for i in range(2)]
    ctx = EpisodeContext("run", 0, "actor-0", task, task_id, "collect")
    episodes = EnvironmentLoop(envs, spec).run(ThresholdPolicy(), list(range(n_episodes)), ctx,
                                               greedy=False)
    items = []
    for ep in episodes:
        assert (ep.action[:, spec.tasks[task_id].action_dim:] == 0).all()  # padding stays 0
        records = episode_records(ep, n_step=2)
        items += [{k: v[i:i + 3] for k, v in records.items()} for i in range(ep.length)]
    return items


def test_two_tasks_train_together_and_both_losses_fall():
    spec = make_env_spec(TASKS, action_repeat=8)
    items = {t: _items(spec, t, 2) for t in range(2)}
    rng = np.random.default_rng(0)
    mixed = (stack_batch([items[t][i] for t in (0, 1)
                          for i in rng.integers(0, len(items[t]), 16)]) for _ in itertools.count())
    config = LearnerConfig(batch_size=32, alpha=1.0, beta=1.0,
                           learning_rate=3e-3, device="cpu", num_threads=1)
    learner = PACLearner(spec, TINY_MODEL, config, mixed, seed=0)
    held_out = {t: stack_batch(items[t][:64]) for t in range(2)}

    def bc_loss(t):
        b, model = held_out[t], learner.model
        with torch.no_grad():
            logits = model.policy_logits(model.encode(b.observation[:, 0], b.task_id))
            return losses.behaviour_cloning_loss(logits, model.action_to_bins(b.action[:, 0]),
                                                 model.action_mask(b.task_id)).item()

    before = [bc_loss(t) for t in range(2)]
    learner.run(80)
    after = [bc_loss(t) for t in range(2)]
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1], (before, after)
