"""A robot's own observation and action spec, from a small YAML file.

    name: cartpole-standin          # the task is "robot:<name>" in the run's env spec
    observations:                   # named arrays, concatenated in this order
      position: [3]                 # shape (flattened); dtype float32 unless given
      velocity: {shape: [2], dtype: float64}
    actions: {shape: [1], minimum: -1.0, maximum: 1.0}
    camera: []                      # [height, width] of its RGB camera, or [] / absent
    instruction: ""                 # optional text of the task (language tokens)

A run lists it in `env.tasks` as `robot:<path of this file>`; `pacflow robot --spec FILE` checks
its environment against the same file before it acts. Every problem names the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from replay.ids import name_problem
from replay.spec import TaskSpec

ROBOT_PREFIX = "robot:"
FIELDS = ("name", "observations", "actions", "camera", "instruction")


class RobotSpecError(ValueError):
    """A robot spec file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class RobotSpec:
    """What one kind of robot observes and how it is commanded."""

    name: str  # the robot task's name; the run's task is "robot:<name>"
    observations: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype), in order
    action_shape: tuple[int]  # (action_dim,): one flat vector of continuous commands
    action_min: float  # lower bound of every action dimension
    action_max: float  # upper bound of every action dimension
    camera: tuple[int, ...] = ()  # (H, W): an RGB camera image per step; () = no camera
    instruction: str = ""  # optional natural-language task description

    @property
    def task_name(self) -> str:
        return f"{ROBOT_PREFIX}{self.name}"

    def task_spec(self) -> TaskSpec:
        """The task as the run's env spec holds it (observation arrays flattened)."""
        return TaskSpec(self.task_name, tuple(n for n, _, _ in self.observations),
                        tuple(int(np.prod(s)) for _, s, _ in self.observations),
                        self.action_shape[0], self.instruction)

    def environment_problems(self, env: Any) -> list[str]:
        """How a dm_env environment differs from this spec (empty when it matches)."""
        problems, obs = [], env.observation_spec()
        names = [n for n in obs if n != "pixels"]
        wanted = [n for n, _, _ in self.observations]
        if names != wanted:
            problems.append(f"observations: the environment has {names}, the spec {wanted} "
                            "(names and order must match)")
        for name, shape, dtype in self.observations:
            if name in obs and int(np.prod(obs[name].shape)) != int(np.prod(shape)):
                problems.append(f"observations.{name}: the environment's shape is "
                                f"{tuple(obs[name].shape)}, the spec's {shape}")
            elif name in obs and np.dtype(obs[name].dtype) != np.dtype(dtype):
                problems.append(f"observations.{name}.dtype: the environment's is "
                                f"{np.dtype(obs[name].dtype)}, the spec's {dtype}")
        act = env.action_spec()
        if tuple(act.shape) != self.action_shape:
            problems.append(f"actions.shape: the environment's is {tuple(act.shape)}, the "
                            f"spec's {self.action_shape}")
        elif not np.allclose([np.min(act.minimum), np.max(act.maximum)],
                             np.asarray([self.action_min, self.action_max], act.dtype)):
            problems.append(f"actions: the environment's bounds are [{np.min(act.minimum)}, "
                            f"{np.max(act.maximum)}], the spec's [{self.action_min}, "
                            f"{self.action_max}]")
        return problems


def is_robot_task(entry: str) -> bool:
    """Whether an `env.tasks` entry names a robot spec file."""
    return entry.startswith(ROBOT_PREFIX)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value):
        raise RobotSpecError(f"{where}: expected a non-empty list of positive ints, got {value!r}")
    return tuple(value)


def _observation(name: str, value: Any, where: str) -> tuple[str, tuple[int, ...], str]:
    if isinstance(value, list):
        value = {"shape": value}
    if not isinstance(value, dict) or set(value) - {"shape", "dtype"} or "shape" not in value:
        raise RobotSpecError(f"{where}: expected [dims] or {{shape: [dims], dtype: ...}}, got "
                             f"{value!r}")
    dtype = value.get("dtype", "float32")
    if dtype not in ("float32", "float64", "int32", "int64", "uint8", "bool"):
        raise RobotSpecError(f"{where}.dtype: {dtype!r} is not a numeric dtype (float32, "
                             "float64, int32, int64, uint8, bool)")
    return name, _shape(value["shape"], f"{where}.shape"), dtype


def _bound(actions: dict, key: str, where: str) -> float:
    value = actions.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not np.isfinite(value):
        raise RobotSpecError(f"{where}.{key}: expected a finite number, got {value!r}")
    return float(value)


def parse_robot_spec(data: Any, where: str = "robot spec") -> RobotSpec:
    """A RobotSpec from parsed YAML; RobotSpecError naming the field otherwise."""
    if not isinstance(data, dict):
        raise RobotSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS:
            raise RobotSpecError(f"{where}: {key}: unknown field (known: {', '.join(FIELDS)})")
    for key in ("name", "observations", "actions"):
        if key not in data:
            raise RobotSpecError(f"{where}: {key}: missing required field")
    name = data["name"]
    problem = name_problem(name, "name")
    if problem:
        raise RobotSpecError(f"{where}: {problem}")
    observations = data["observations"]
    if not isinstance(observations, dict) or not observations:
        raise RobotSpecError(f"{where}: observations: expected a mapping of named arrays")
    obs = tuple(_observation(str(k), v, f"{where}: observations.{k}")
                for k, v in observations.items())
    actions = data["actions"]
    if not isinstance(actions, dict) or set(actions) - {"shape", "minimum", "maximum"}:
        raise RobotSpecError(f"{where}: actions: expected {{shape: [dim], minimum: x, maximum: "
                             f"y}}, got {actions!r}")
    shape = _shape(actions.get("shape"), f"{where}: actions.shape")
    if len(shape) != 1:
        raise RobotSpecError(f"{where}: actions.shape: expected one dimension, got {list(shape)}")
    low, high = (_bound(actions, k, f"{where}: actions") for k in ("minimum", "maximum"))
    if low >= high:
        raise RobotSpecError(f"{where}: actions: minimum {low} must be below maximum {high}")
    camera = data.get("camera") or []
    camera = _shape(camera, f"{where}: camera") if camera else ()
    if camera and len(camera) != 2:
        raise RobotSpecError(f"{where}: camera: expected [height, width], got {list(camera)}")
    instruction = data.get("instruction", "")
    if not isinstance(instruction, str):
        raise RobotSpecError(f"{where}: instruction: expected a string, got {instruction!r}")
    return RobotSpec(name, obs, shape, low, high, camera, instruction)  # type: ignore[arg-type]


def load_robot_spec(path: str | Path) -> RobotSpec:
    """Reads a robot spec YAML file; RobotSpecError naming the file and field otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RobotSpecError(f"robot spec {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RobotSpecError(f"robot spec {path}: not valid YAML "
                             f"({str(e).splitlines()[0]})") from None
    return parse_robot_spec(data, f"robot spec {path}")


def robot_spec_of(entry: str) -> RobotSpec:
    """The spec an `env.tasks` entry `robot:<file>` names."""
    return load_robot_spec(entry[len(ROBOT_PREFIX):])
