"""dm_env environments built from names such as "dm_control:cartpole-swingup".

Observations come out as named float32 arrays (each flattened), actions go in as float32 arrays
within the spec's bounds, and each task has an integer id: its index in the task list the
environments were built for.
"""

from __future__ import annotations

import os
from typing import Sequence

import dm_env
import numpy as np
from dm_env import specs

from replay.spec import EnvSpec

# State-based tasks need no renderer; pixel configs set MUJOCO_GL=egl or osmesa explicitly.
os.environ.setdefault("MUJOCO_GL", "disable")

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


class FlatObservationWrapper(SeededEnvironment):
    """Casts observations to flattened float32 arrays and repeats each action `action_repeat`
    times, summing rewards and multiplying discounts (dm_control's usual frame skip)."""

    def __init__(self, env: dm_env.Environment, action_repeat: int = 1):
        self._env, self._action_repeat = env, action_repeat
        self._names = tuple(env.observation_spec().keys())
        self.num_env_steps = 0

    def seed(self, seed: int) -> None:
        self._env.task.random.seed(seed)  # dm_control tasks draw initial states from this

    def _convert(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
        obs = {k: np.asarray(timestep.observation[k], np.float32).reshape(-1) for k in self._names}
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


def make_environment(name: str, seed: int, action_repeat: int = 1) -> SeededEnvironment:
    """Builds one environment; `seed` fixes its random initial states."""
    domain, task = parse_task_name(name)
    from dm_control import suite

    env = suite.load(domain, task, task_kwargs={"random": seed})
    return FlatObservationWrapper(env, action_repeat)


def make_env_spec(task_names: Sequence[str], action_repeat: int = 1) -> EnvSpec:
    """The EnvSpec shared by every task in `task_names` (they must share shapes for now)."""
    envs = [make_environment(n, seed=0, action_repeat=action_repeat) for n in task_names]
    obs_specs = [e.observation_spec() for e in envs]
    act_specs = [e.action_spec() for e in envs]
    first_obs, first_act = obs_specs[0], act_specs[0]
    for name, o, a in zip(task_names, obs_specs, act_specs):
        if {k: v.shape for k, v in o.items()} != {k: v.shape for k, v in first_obs.items()} \
                or a.shape != first_act.shape:
            raise UnknownTaskError(f"task {name!r} has other observation/action shapes than "
                                   f"{task_names[0]!r}; mixed shapes are not supported yet")
    return EnvSpec(
        obs_names=tuple(first_obs.keys()),
        obs_sizes=tuple(int(v.shape[0]) for v in first_obs.values()),
        action_dim=int(first_act.shape[0]),
        action_min=float(np.min(first_act.minimum)),
        action_max=float(np.max(first_act.maximum)),
        task_names=tuple(task_names),
    )


def flatten_observation(observation: dict[str, np.ndarray], spec: EnvSpec) -> np.ndarray:
    """Named arrays -> one (obs_dim,) float32 vector in spec order."""
    return np.concatenate([observation[k] for k in spec.obs_names]).astype(np.float32, copy=False)
