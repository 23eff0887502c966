"""Robot spec files: parsed strictly (every problem names its field), turned into the run's
task, checked against the robot's environment, and enforced on uploads by validation."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.envs import make_env_spec
from actors.robot_spec import RobotSpecError, load_robot_spec, parse_robot_spec
from actors.standins import cartpole
from cluster.config import ConfigError, load_config
from replay.validation import episode_problems
from tests.fakes import make_episode

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "deploy/robots/cartpole.yaml"


def _data() -> dict:
    return yaml.safe_load(SPEC.read_text())


def test_the_stand_in_matches_its_spec_and_becomes_a_robot_task():
    spec = load_robot_spec(SPEC)
    assert spec.environment_problems(cartpole(seed=0)) == []
    env_spec = make_env_spec([f"robot:{SPEC}", "dm_control:cartpole-balance"], 8)
    task = env_spec.tasks[0]
    assert (task.name, task.obs_names, task.obs_sizes, task.action_dim) == \
        ("robot:cartpole-standin", ("position", "velocity"), (3, 2), 1)
    assert (env_spec.action_min, env_spec.action_max) == (-1.0, 1.0)


@pytest.mark.parametrize("change, field", [
    ({"observations": {"position": [3], "velocity": [0]}}, "observations.velocity.shape"),
    ({"observations": {"position": {"shape": [3], "dtype": "complex"}}},
     "observations.position.dtype"),
    ({"actions": {"shape": [1], "minimum": 1.0, "maximum": -1.0}}, "actions: minimum"),
    ({"actions": {"shape": [1, 2], "minimum": -1, "maximum": 1}}, "actions.shape"),
    ({"actions": {"shape": [1], "minimum": "low", "maximum": 1}}, "actions.minimum"),
    ({"camera": [64]}, "camera"),
    ({"name": "../arm"}, "name"),
    ({"colour": "red"}, "colour: unknown field"),
])
def test_every_problem_names_its_field(change, field):
    with pytest.raises(RobotSpecError, match=f"robot spec x: {field}".replace(".", r"\.")):
        parse_robot_spec({**_data(), **change}, "robot spec x")


def test_a_missing_field_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(RobotSpecError, match="actions: missing required field"):
        parse_robot_spec({k: v for k, v in _data().items() if k != "actions"})
    with pytest.raises(RobotSpecError, match="nosuch.yaml"):
        load_robot_spec(tmp_path / "nosuch.yaml")


def test_an_environment_that_differs_from_its_spec_is_named(tmp_path):
    wrong = parse_robot_spec({**_data(), "observations": {"position": [3], "velocity": [3]},
                              "actions": {"shape": [1], "minimum": -2, "maximum": 2}})
    problems = wrong.environment_problems(cartpole(seed=0))
    assert any(p.startswith("observations.velocity:") for p in problems)
    assert any(p.startswith("actions:") and "[-1.0, 1.0]" in p for p in problems)
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump({**_data(), "observations": {"pos": [3], "velocity": [2]}}))
    robot = subprocess.run([sys.executable, "-m", "cluster.cli", "robot", "--gateway",
                            "127.0.0.1:1", "--env", "actors.standins:cartpole", "--spec",
                            str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert robot.returncode == 2
    assert robot.stderr.strip().splitlines() == [
        f"pacflow: error: --spec {path}: observations: the environment has ['position', "
        "'velocity'], the spec ['pos', 'velocity'] (names and order must match)"]


def test_uploads_that_do_not_fit_the_robot_task_are_refused_naming_the_field():
    spec = make_env_spec([f"robot:{SPEC}", "dm_control:walker-walk"], 8)  # padded to walker's
    good = make_episode(length=5, spec=spec)
    task = spec.tasks[0]
    good.observation[:, task.obs_dim:] = 0.0
    good.action[:, task.action_dim:] = 0.0
    assert episode_problems(good, spec) == []
    renamed = dataclasses.replace(good, lineage=dataclasses.replace(good.lineage, task="arm"))
    assert episode_problems(renamed, spec) == \
        ["lineage.task: 'arm' is not task 0 of the run (robot:cartpole-standin)"]
    wide = dataclasses.replace(good, observation=good.observation.copy())
    wide.observation[2, task.obs_dim] = 1.0  # a sixth observation value
    assert episode_problems(wide, spec) == \
        ["observation: nonzero values past the 5 of robot:cartpole-standin"]
    strong = dataclasses.replace(good, action=good.action.copy())
    strong.action[1, 0] = np.float32(3.0)
    assert episode_problems(strong, spec) == ["action: values outside [-1.0, 1.0]"]


def test_run_configs_name_bad_robot_entries(tmp_path):
    with pytest.raises(ConfigError, match="cluster.num_actors: 0 leaves the simulator tasks"):
        load_config(ROOT / "deploy/configs/smoke.yaml", ["cluster.num_actors=0"])
    with pytest.raises(ConfigError, match="loop.robot_episodes_per_cycle: no robot"):
        load_config(ROOT / "deploy/configs/smoke.yaml", ["loop.robot_episodes_per_cycle=2"])
    with pytest.raises(ConfigError, match="loop.robot_on_timeout: 'later' is not one of"):
        load_config(ROOT / "deploy/configs/robot_fleet.yaml", ["loop.robot_on_timeout=later"])
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "run", "--config",
                          "deploy/configs/robot_fleet.yaml", "--set",
                          "env.tasks=[robot:nosuch.yaml]", "--run-dir", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and not (tmp_path / "r").exists()
    assert bad.stderr.strip().splitlines() == [
        "pacflow: error: env.tasks: robot spec nosuch.yaml: No such file or directory"]


class _Env:
    """An environment's specs only: what `environment_problems` reads."""

    def __init__(self, obs: dict, low: float, high: float):
        from dm_env import specs

        self._obs = {k: specs.Array(s, d, k) for k, (s, d) in obs.items()}
        self._act = specs.BoundedArray((1,), np.float32, low, high)

    def observation_spec(self):
        return self._obs

    def action_spec(self):
        return self._act


def test_shapes_flatten_dtypes_count_and_float32_bounds_match():
    from actors.envs import flatten_observation
    from replay.spec import TaskSpec

    spec = parse_robot_spec({"name": "arm", "observations": {"joints": [2, 3]},
                             "actions": {"shape": [1], "minimum": -0.3, "maximum": 0.3}})
    assert spec.environment_problems(_Env({"joints": ((2, 3), np.float32)}, -0.3, 0.3)) == []
    assert spec.environment_problems(_Env({"joints": ((2, 3), np.float64)}, -0.3, 0.3)) == [
        "observations.joints.dtype: the environment's is float64, the spec's float32"]
    flat = flatten_observation({"joints": np.arange(6, dtype=np.float32).reshape(2, 3)},
                               TaskSpec("robot:arm", ("joints",), (6,), 1), 8)
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 0, 0])


def test_a_run_refuses_robot_specs_it_cannot_serve(tmp_path):
    wide = tmp_path / "wide.yaml"
    wide.write_text(yaml.safe_dump({**_data(), "name": "wide",
                                    "actions": {"shape": [1], "minimum": -2, "maximum": 2}}))
    with pytest.raises(RobotSpecError, match=r"actions \[-2.0, 2.0\] differ from the run's"):
        make_env_spec([f"robot:{wide}", "dm_control:cartpole-balance"], 8)
    with pytest.raises(RobotSpecError, match=r"camera \[\] differs from the run's env.pixels"):
        make_env_spec([f"robot:{SPEC}"], 8, pixels_shape=(64, 64, 3))
    twin = tmp_path / "twin.yaml"
    twin.write_text(SPEC.read_text())
    with pytest.raises(RobotSpecError, match="robot:cartpole-standin appears twice"):
        make_env_spec([f"robot:{SPEC}", f"robot:{twin}"], 8)
