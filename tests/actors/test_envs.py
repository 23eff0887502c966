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


def test_camera_observations_are_rendered_uint8_frames():
    spec = make_env_spec([TASK], action_repeat=8, pixels_shape=(32, 48, 3))
    assert spec.pixels_shape == (32, 48, 3) and spec.obs_dim == 5  # pixels are not a vector
    env = make_environment(TASK, seed=0, action_repeat=8, pixels_shape=(32, 48, 3))
    loop = EnvironmentLoop([env], spec)
    ctx = EpisodeContext("run", 0, "actor-0", TASK, 0, "collect")
    [episode] = loop.run(RandomPolicy(spec, 11, seed=0), seeds=[1], context=ctx, greedy=False)
    assert episode.pixels.shape == (episode.length + 1, 32, 48, 3)
    assert episode.pixels.dtype == np.uint8 and episode.pixels.std() > 0
    assert not np.array_equal(episode.pixels[0], episode.pixels[-1])  # the cart moved


def test_small_camera_images_use_a_small_shadow_map_and_look_the_same():
    from dm_control import suite

    from actors.envs import shadow_map_size

    assert shadow_map_size((64, 64, 3), 2048) == 512
    assert shadow_map_size((16, 16, 3), 2048) == 256  # never below 256
    assert shadow_map_size((480, 640, 3), 2048) == 2048  # never above the model's own
    assert shadow_map_size((64, 64, 3), 128) == 128
    walker = "dm_control:walker-walk"
    env = make_environment(walker, seed=3, pixels_shape=(64, 64, 3))
    assert env._env.physics.model.vis.quality.shadowsize == 512
    ours = env.reset().observation["pixels"].astype(np.float64)
    suite_env = suite.load("walker", "walk", task_kwargs={"random": 3})
    assert suite_env.physics.model.vis.quality.shadowsize == 2048
    suite_env.reset()
    full = suite_env.physics.render(64, 64, camera_id=0).astype(np.float64)
    # The same picture (0.0-0.02 of 255 apart on average when measured); without shadows the
    # walker frame is ~6 darker or lighter on average.
    assert np.abs(ours - full).mean() < 0.5
    assert ours.std() > 10  # a picture, not a blank frame


def test_renderer_is_egl_on_nvidia_nodes_else_osmesa(monkeypatch):
    import ctypes.util
    import os

    from actors import envs

    libs = {"EGL": "libEGL.so.1", "OSMesa": "libOSMesa.so.8"}
    monkeypatch.setattr(ctypes.util, "find_library", libs.get)
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert envs.default_gl_backend() == "egl"
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    assert envs.default_gl_backend() == "osmesa"
    monkeypatch.setattr(ctypes.util, "find_library", {}.get)
    assert envs.default_gl_backend() == "disable"
