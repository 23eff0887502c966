"""Environments by name, and the batched acting loop."""

import numpy as np
import pytest

from actors.envs import UnknownTaskError, make_env_spec, make_environment, parse_task_name
from actors.loop import EnvironmentLoop, EpisodeContext
from policies.policy import RandomPolicy

TASK = "dm_control:cartpole-swingup"


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(UnknownTaskError) as err:
        parse_task_name("dm_control:cartpole-flip")
    assert "dm_control:cartpole-swingup" in str(err.value)
    assert "dm_control:walker-walk" in str(err.value)


def test_observations_are_named_float32_arrays():
    env = make_environment("dm_control:walker-walk", seed=0)
    ts = env.reset()
    assert set(ts.observation) == {"orientations", "height", "velocity"}
    assert all(v.dtype == np.float32 and v.ndim == 1 for v in ts.observation.values())
    spec = make_env_spec(["dm_control:walker-walk"])
    assert spec.obs_dim == 24 and spec.action_dim == 6 and spec.task_names == \
        ("dm_control:walker-walk",)


def test_action_repeat_and_seeded_episodes():
    spec = make_env_spec([TASK], action_repeat=4)
    envs = [make_environment(TASK, seed=i, action_repeat=4) for i in range(2)]
    loop = EnvironmentLoop(envs, spec)
    ctx = EpisodeContext("run", 0, "actor-0", TASK, 0, "collect")
    a = loop.run(RandomPolicy(spec, 11, seed=0), seeds=[5, 6, 7], context=ctx, greedy=False)
    b = loop.run(RandomPolicy(spec, 11, seed=0), seeds=[5, 6, 7], context=ctx, greedy=False)
    assert [e.length for e in a] == [250, 250, 250]  # 1000 steps / repeat 4
    assert envs[0].num_env_steps == 2 * 2 * 1000  # two waves per run, twice
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.observation, y.observation)
        assert x.truncated and not x.terminated and x.discount[-2] == 1.0
        assert (x.policy_version == 0).all() and x.lineage.seed in (5, 6, 7)
    assert len({e.lineage.episode_id for e in a + b}) == 6
