"""Strict config parsing: every problem names its field."""

import pathlib

import pytest

from cluster.config import ConfigError, apply_overrides, config_from_dict, load_config

BASE = {"env": {"tasks": ["dm_control:cartpole-swingup"]},
        "loop": {"num_cycles": 2, "episodes_per_cycle": 4, "learner_steps_per_cycle": 10}}


def _with(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def test_defaults_fill_optional_sections():
    config = config_from_dict(BASE)
    assert config.learner.batch_size == 256 and config.replay.n_step == 1
    assert config.learner.learning_rate == 3e-4


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict(_with(learner={"alpha": 1})).learner.alpha == 1.0
    with pytest.raises(ConfigError, match=r"learner.batch_size: expected int, got float 2.5"):
        config_from_dict(_with(learner={"batch_size": 2.5}))


@pytest.mark.parametrize("data,message", [
    ({"loop": BASE["loop"]}, "env: missing required field"),
    (_with(env={"tasks": "dm_control:cartpole-swingup"}), "env.tasks: expected a list"),
    (_with(env={"tasks": ["a", 3]}), r"env.tasks\[1\]: expected str"),
    (_with(env={"tasks": []}), "env.tasks=.* must be a non-empty list"),
    ({"env": BASE["env"], "loop": {"num_cycles": 2, "episodes_per_cycle": 4}},
     "loop.learner_steps_per_cycle: missing required field"),
    (_with(learner={"batch_size": "big"}), "learner.batch_size: expected int, got str 'big'"),
    (_with(learner={"batchsize": 3}), "learner.batchsize: unknown field"),
    (_with(learner={"alpha": 1.5}), r"learner.alpha=1.5 must be in \[0, 1\]"),
    (_with(loop={"num_cycles": True}), "loop.num_cycles: expected int, got bool"),
    (_with(model={"width": 30, "num_heads": 4}), "model.width=30 must be divisible"),
    (_with(env={"pixels": [64]}), r"env.pixels=\[64\] must be \[height, width\]"),
    (_with(env={"pixels": [64, 64]}, model={"patch_size": 6}),
     r"model.patch_size=6 must divide the camera image size env.pixels=\[64, 64\]"),
    (_with(env={"instructions": ["a", "b"]}), "env.instructions has 2 entries; give one per task"),
    (_with(cluster={"envs_per_actor": 2, "env_processes": 2}),
     r"cluster.env_processes=2 must be in \[0, cluster.envs_per_actor - 1 = 1\]"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_overrides_parse_values_as_yaml():
    data = apply_overrides(_with(), ["learner.batch_size=512", "env.action_repeat=2"])
    config = config_from_dict(data)
    assert config.learner.batch_size == 512 and config.env.action_repeat == 2
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["learner.batch_size"])


def test_shipped_presets_parse():
    for name in ("cartpole", "smoke", "cartpole_pixels"):
        config = load_config(f"deploy/configs/{name}.yaml")
        assert config.env.tasks == ("dm_control:cartpole-swingup",)


def test_enum_fields_parse_from_their_values():
    from learners.config import CriticTarget, TargetUpdate

    config = config_from_dict(_with(learner={"critic_target": "hl_gauss",
                                             "target_update": "polyak"}))
    assert config.learner.critic_target is CriticTarget.HL_GAUSS
    assert config.learner.target_update is TargetUpdate.POLYAK
    with pytest.raises(ConfigError, match="learner.critic_target: 'mse' is not one of c51"):
        config_from_dict(_with(learner={"critic_target": "mse"}))


def test_model_presets_and_overrides():
    config = config_from_dict(_with(model={"preset": "small", "depth": 2}))
    assert (config.model.width, config.model.num_latents, config.model.depth) == (256, 32, 2)
    with pytest.raises(ConfigError, match="model.preset: 'huge' is not one of tiny, small"):
        config_from_dict(_with(model={"preset": "huge"}))


def test_actor_tasks_deal_tasks_round_robin():
    from cluster.collector import actor_tasks

    assert actor_tasks(("a", "b", "c"), 0, 2) == ["a", "c"]
    assert actor_tasks(("a", "b", "c"), 1, 2) == ["b"]
    assert [actor_tasks(("a",), i, 3) for i in range(3)] == [["a"]] * 3


def test_config_round_trips_through_plain_yaml():
    import yaml

    from cluster.config import config_to_dict

    config = config_from_dict(_with(env={"tasks": ["a:b-c", "a:d-e"]},
                                    learner={"critic_target": "hl_gauss"}))
    data = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    assert data == config_to_dict(config)
    assert config_from_dict(data) == config


def test_loop_schedule_random_episodes_and_evaluation():
    loop = config_from_dict(_with(loop={"num_cycles": 10, "random_episodes": 3,
                                        "eval_every": 4})).loop
    assert [loop.episodes(c) for c in (0, 1, 9)] == [3, 4, 4]
    assert [c for c in range(10) if loop.evaluates(c)] == [3, 7, 9]  # every 4th and the last
    default = config_from_dict(BASE).loop
    assert default.episodes(0) == 4 and all(default.evaluates(c) for c in range(2))


@pytest.mark.parametrize("loop,message", [
    ({"eval_every": 0}, "loop.eval_every=0 must be >= 1"),
    ({"random_episodes": -1}, "loop.random_episodes=-1 must be >= 0"),
    ({"budget_seconds": -5}, "loop.budget_seconds=-5.0 must be >= 0"),
    ({"mode": "sometimes"}, "loop.mode: 'sometimes' is not one of cycles, async"),
    ({"max_env_steps": -1}, "loop.max_env_steps=-1 must be >= 0"),
])
def test_bad_loop_schedule_names_the_field(loop, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_with(loop=loop))


def test_async_mode_needs_the_sample_to_insert_limiter_and_one_learner():
    with pytest.raises(ConfigError, match="replay.rate_limiter: loop.mode=async needs "
                                          "sample_to_insert"):
        config_from_dict(_with(loop={"mode": "async"}))
    limited = {"rate_limiter": "sample_to_insert"}
    with pytest.raises(ConfigError, match="cluster.learner_workers: loop.mode=async"):
        config_from_dict(_with(loop={"mode": "async"}, replay=limited,
                               cluster={"learner_workers": 2}))
    loop = config_from_dict(_with(loop={"mode": "async", "publish_every": 7},
                                  replay=limited)).loop
    assert loop.updates_per_version() == 7
    assert config_from_dict(BASE).loop.updates_per_version() == \
        BASE["loop"]["learner_steps_per_cycle"]


@pytest.mark.parametrize("path", sorted(
    str(p) for p in (pathlib.Path(__file__).resolve().parents[2]
                     / "deploy" / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_and_names_real_tasks(path, monkeypatch):
    from actors.envs import parse_task_name
    from actors.robot_spec import is_robot_task, robot_spec_of

    monkeypatch.chdir(pathlib.Path(path).parents[2])  # robot spec paths are relative to the repo
    config = load_config(path)
    for task in config.env.tasks:
        if is_robot_task(task):
            assert robot_spec_of(task).task_name.startswith("robot:")
        else:
            parse_task_name(task)


def test_env_processes_without_their_cpus_is_warned_about():
    from cluster.preflight import placement_warnings

    short = config_from_dict(_with(cluster={"envs_per_actor": 4, "env_processes": 2}))
    (line,) = placement_warnings(short.cluster)
    assert "cluster.env_processes=2" in line and "set cluster.actor_cpus=3" in line
    enough = config_from_dict(_with(cluster={"envs_per_actor": 4, "env_processes": 2,
                                             "actor_cpus": 3}))
    assert placement_warnings(enough.cluster) == []
    assert placement_warnings(config_from_dict(BASE).cluster) == []
    # Without env processes a fraction of a CPU is the user's choice (the smoke configs' 0.5).
    assert placement_warnings(config_from_dict(_with(cluster={"actor_cpus": 0.5})).cluster) == []
