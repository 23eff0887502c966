"""dm_env environments built from names such as "dm_control:cartpole-swingup".

Observations come out as named float32 arrays (each flattened), actions go in as float32 arrays
within the spec's bounds, and each task has an integer id: its index in the task list the
environments were built for.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import os
from typing import Sequence

import dm_env
import numpy as np
from dm_env import specs

from actors.robot_spec import RobotSpecError, is_robot_task, robot_spec_of
from replay.spec import EnvSpec, TaskSpec



def default_gl_backend() -> str:
    """The MuJoCo renderer for camera images: EGL on an NVIDIA node, else OSMesa (software, the
    Makefile installs it), else none. A MUJOCO_GL set by the user wins."""
    if os.path.exists("/dev/nvidiactl") and ctypes.util.find_library("EGL"):
        return "egl"
    return "osmesa" if ctypes.util.find_library("OSMesa") else "disable"


# Read once, when dm_control is first imported in the process.
os.environ.setdefault("MUJOCO_GL", default_gl_backend())

SUITE_PREFIX = "dm_control:"


class UnknownTaskError(ValueError):
    """Raised for a task name that no suite provides; the message lists the valid names."""


def valid_task_names() -> list[str]:
    from dm_control import suite

    return [f"{SUITE_PREFIX}{domain}-{task}" for domain, task in suite.ALL_TASKS]


def parse_task_name(name: str) -> tuple[str, str]:
    """'dm_control:cartpole-swingup' -> ('cartpole', 'swingup'); raises UnknownTaskError."""
    valid = valid_task_names()
    if name not in valid:
        raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}")
    domain, _, task = name[len(SUITE_PREFIX):].partition("-")
    return domain, task


class SeededEnvironment(dm_env.Environment):
    """A dm_env environment whose next episode can be seeded, and that counts its raw steps."""

    num_env_steps: int = 0  # underlying environment steps taken so far (action repeats count)

    def seed(self, seed: int) -> None:
        """Fixes the random initial state of the next episode."""
        raise NotImplementedError


SHADOW_MAP_TEXELS_PER_PIXEL = 8  # shadow map side per image side: as sharp as the image shows


def shadow_map_size(pixels_shape: tuple[int, ...], model_size: int) -> int:
    """The shadow map side for camera images of `pixels_shape` (H, W, 3): the model's, capped
    at SHADOW_MAP_TEXELS_PER_PIXEL x the image's longer side (at least 256). The suite's 2048
    map is most of a small image's cost in software rendering (64 x 64 with OSMesa: 13.6-15 ms
    a frame, 6-9 ms with a 512 map), and at 64 x 64 a 512 map gives the same image to within
    0.05 of 255 on average (tests/actors/test_envs.py)."""
    return min(model_size, max(256, SHADOW_MAP_TEXELS_PER_PIXEL * max(pixels_shape[:2])))


class FlatObservationWrapper(SeededEnvironment):
    """Casts observations to flattened float32 arrays and repeats each action `action_repeat`
    times, summing rewards and multiplying discounts (dm_control's usual frame skip).

    With `pixels_shape` (H, W, 3) every observation also holds "pixels": the scene rendered by
    camera `camera_id` as uint8 (not part of observation_spec, which names the vectors). The
    shadow map is sized to the image (shadow_map_size), not to the suite's 2048 x 2048."""

    def __init__(self, env: dm_env.Environment, action_repeat: int = 1,
                 pixels_shape: tuple[int, ...] = (), camera_id: int = 0):
        self._env, self._action_repeat = env, action_repeat
        self._names = tuple(env.observation_spec().keys())
        self._pixels_shape, self._camera_id = tuple(pixels_shape), camera_id
        self.num_env_steps = 0
        if self._pixels_shape:  # before the first render: the context is made with this size
            quality = env.physics.model.vis.quality
            quality.shadowsize = shadow_map_size(self._pixels_shape, quality.shadowsize)

    def seed(self, seed: int) -> None:
        self._env.task.random.seed(seed)  # dm_control tasks draw initial states from this

    def _convert(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
        obs = {k: np.asarray(timestep.observation[k], np.float32).reshape(-1) for k in self._names}
        if self._pixels_shape:
            h, w, _ = self._pixels_shape
            obs["pixels"] = self._env.physics.render(h, w, camera_id=self._camera_id)  # (H, W, 3)
        return timestep._replace(observation=obs)

    def reset(self) -> dm_env.TimeStep:
        return self._convert(self._env.reset())

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        reward, discount = 0.0, 1.0
        for _ in range(self._action_repeat):
            timestep = self._env.step(action)
            self.num_env_steps += 1
            reward += float(timestep.reward or 0.0) * discount
            discount *= float(timestep.discount if timestep.discount is not None else 1.0)
            if timestep.last():
                break
        return self._convert(timestep._replace(reward=np.float32(reward),
                                               discount=np.float32(discount)))

    def observation_spec(self) -> dict[str, specs.Array]:
        return {k: specs.Array((int(np.prod(s.shape)),), np.float32, k)
                for k, s in self._env.observation_spec().items()}

    def action_spec(self) -> specs.BoundedArray:
        return self._env.action_spec()


def make_environment(name: str, seed: int, action_repeat: int = 1,
                     pixels_shape: tuple[int, ...] = (), camera_id: int = 0,
                     time_limit: float | None = None) -> SeededEnvironment:
    """Builds one environment; `seed` fixes its random initial states. With `pixels_shape`
    (H, W, 3) observations include camera images (needs MUJOCO_GL=egl or osmesa).
    `time_limit` (simulated seconds) overrides the task's episode length."""
    domain, task = parse_task_name(name)
    from dm_control import suite

    task_kwargs = {"random": seed} if time_limit is None else \
        {"random": seed, "time_limit": time_limit}
    env = suite.load(domain, task, task_kwargs=task_kwargs)
    return FlatObservationWrapper(env, action_repeat, pixels_shape, camera_id)


def make_env_spec(task_names: Sequence[str], action_repeat: int = 1,
                  pixels_shape: tuple[int, ...] = (),
                  instructions: Sequence[str] = ()) -> EnvSpec:
    """The EnvSpec of the tasks in `task_names`; task id i is task_names[i], described by
    instructions[i] when instructions are given. A `robot:<file>` entry is the robot spec in that
    file (actors/robot_spec.py), named `robot:<its name>`; RobotSpecError names its problem."""
    tasks, lows, highs = [], [], []
    for i, name in enumerate(task_names):
        if is_robot_task(name):  # a robot's own spec file; its camera must be the run's
            robot = robot_spec_of(name)
            if ((*robot.camera, 3) if robot.camera else ()) != tuple(pixels_shape):
                raise RobotSpecError(f"{name}: camera {list(robot.camera)} differs from the "
                                     f"run's env.pixels {list(pixels_shape[:2])}")
            task = robot.task_spec()
            tasks.append(dataclasses.replace(task, instruction=instructions[i])
                         if instructions and instructions[i] else task)
            lows.append(robot.action_min)
            highs.append(robot.action_max)
            continue
        env = make_environment(name, seed=0, action_repeat=action_repeat)
        obs, act = env.observation_spec(), env.action_spec()
        tasks.append(TaskSpec(name, tuple(obs), tuple(int(v.shape[0]) for v in obs.values()),
                              int(act.shape[0]), instructions[i] if instructions else ""))
        lows.append(float(np.min(act.minimum)))
        highs.append(float(np.max(act.maximum)))
    names = [t.name for t in tasks]
    for name, task, low, high in zip(task_names, tasks, lows, highs):
        if names.count(task.name) > 1:
            raise RobotSpecError(f"{name}: task name {task.name} appears twice in env.tasks")
        # One action range per run (the policy's bins span it): a robot's is every task's.
        others = {(a, b) for a, b in zip(lows, highs)} - {(low, high)}
        if is_robot_task(name) and others:
            raise RobotSpecError(f"{name}: actions [{low}, {high}] differ from the run's other "
                                 f"tasks' {' '.join(f'[{a}, {b}]' for a, b in sorted(others))}")
    return EnvSpec(tuple(tasks), min(lows), max(highs), tuple(pixels_shape))


def flatten_observation(observation: dict[str, np.ndarray], task: TaskSpec,
                        obs_dim: int) -> np.ndarray:
    """Named arrays -> one (obs_dim,) float32 vector in task order, zero-padded to obs_dim."""
    flat = np.zeros(obs_dim, np.float32)
    flat[:task.obs_dim] = np.concatenate([np.ravel(observation[k]) for k in task.obs_names])
    return flat
