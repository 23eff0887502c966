"""The acting loop: K environments stepped together with one batched policy call per step.

Episodes run in waves of up to K (one per environment). The policy is fixed for a wave, so a
policy version changes only at episode boundaries.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Callable, Sequence

import dm_env
import numpy as np

from actors.env_group import EnvGroup, LocalEnvs
from actors.envs import SeededEnvironment, flatten_observation
from policies.policy import Policy
from replay.spec import EnvSpec, Episode, Lineage


@dataclasses.dataclass(frozen=True)
class EpisodeContext:
    """Lineage fields the loop does not decide itself."""

    run_id: str  # run directory id
    cycle: int  # collect-and-infer cycle
    actor_id: str  # "actor-<i>"
    task: str  # environment name
    task_id: int  # index of the task in the EnvSpec
    mode: str  # "collect" or "eval"


def episode_identity(run_id: str, mode: str, cycle: int, actor_id: str, index: int) -> str:
    """The id of the `index`-th `mode` episode of `actor_id` in `cycle`: a uuid5 (hex) of those
    fields, so a restarted actor that redoes the episode gives it the same id and the archive
    keeps it once."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"pacflow:{run_id}/{mode}/{cycle}/{actor_id}/{index}").hex


class EpisodeBuffer:
    """One episode's steps as they happen; `episode()` turns them into an Episode.
    Shared by the sim acting loop and the robot client."""

    def __init__(self) -> None:
        self.observations: list[np.ndarray] = []  # (obs_dim,) each, one more than actions
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.discounts: list[float] = []
        self.pixels: list[np.ndarray] = []

    @property
    def length(self) -> int:
        return len(self.actions)

    def observe(self, observation: np.ndarray, pixels: np.ndarray | None) -> None:
        self.observations.append(observation)
        if pixels is not None:
            self.pixels.append(pixels)

    def record(self, action: np.ndarray, timestep: dm_env.TimeStep) -> None:
        """The action taken and the timestep it led to (dm_env: discount 0 = termination)."""
        self.actions.append(action.astype(np.float32))
        self.rewards.append(float(timestep.reward or 0.0))
        self.discounts.append(1.0 if timestep.discount is None else float(timestep.discount))

    def episode(self, spec: EnvSpec, task_id: int, lineage: Lineage) -> Episode:
        """Needs length + 1 observations; the last action slot is padding."""
        T = self.length
        terminated = self.discounts[-1] == 0.0
        return Episode(
            lineage=lineage, task_id=task_id,
            observation=np.stack(self.observations[:T + 1]).astype(np.float32),
            action=np.concatenate([np.stack(self.actions),
                                   np.zeros((1, spec.action_dim), np.float32)]),
            reward=np.array(self.rewards + [0.0], np.float32),
            discount=np.array(self.discounts + [0.0], np.float32),
            policy_version=np.full(T + 1, lineage.policy_version, np.int64),
            terminated=terminated, truncated=not terminated,
            pixels=np.stack(self.pixels[:T + 1]) if self.pixels else None,
        )


class EnvironmentLoop:
    """Runs episodes on a fixed list of environments.

    Usage:
        loop = EnvironmentLoop(envs, spec)
        episodes = loop.run(policy, seeds=[1, 2], context=ctx, greedy=False)
    """

    def __init__(self, envs: Sequence[SeededEnvironment] | EnvGroup, spec: EnvSpec):
        # a list of environments is stepped in this process; an EnvGroup as it steps them
        self._envs = envs if isinstance(envs, EnvGroup) else LocalEnvs(envs)
        self._spec = spec
        # episode id -> (mean, max) over its steps of newest_version() minus the acting version
        self.staleness: dict[str, tuple[float, int]] = {}

    def run(self, policy: Policy, seeds: Sequence[int], context: EpisodeContext,
            greedy: bool, episode_ids: Sequence[str] | None = None,
            newest_version: Callable[[], int] | None = None) -> list[Episode]:
        """One episode per seed, in waves of len(envs); returns them in seed order. Episode ids
        are `episode_ids` when given (one per seed), else random. With `newest_version` (the
        newest policy version that exists), each step's staleness goes into `self.staleness`."""
        ids = list(episode_ids) if episode_ids is not None else \
            [uuid.uuid4().hex for _ in seeds]
        assert len(ids) == len(seeds), "one episode id per seed"
        episodes: list[Episode] = []
        k = len(self._envs)
        for start in range(0, len(seeds), k):
            episodes.extend(self._wave(policy, seeds[start:start + k], ids[start:start + k],
                                       context, greedy, newest_version))
        return episodes

    def _wave(self, policy: Policy, seeds: Sequence[int], ids: Sequence[str],
              ctx: EpisodeContext, greedy: bool,
              newest_version: Callable[[], int] | None) -> list[Episode]:
        lags: list[list[int]] = [[] for _ in seeds]  # per env, per step
        start_time = time.time()
        timesteps = self._envs.reset(seeds)
        buffers = [EpisodeBuffer() for _ in seeds]
        active = list(range(len(seeds)))
        task_ids = np.full(len(seeds), ctx.task_id, np.int64)
        task, obs_dim = self._spec.tasks[ctx.task_id], self._spec.obs_dim
        camera = bool(self._spec.pixels_shape)
        while active:
            obs = np.stack([flatten_observation(timesteps[i].observation, task, obs_dim)
                            for i in active])  # (k, obs_dim), zero-padded
            pixels = np.stack([timesteps[i].observation["pixels"] for i in active]) \
                if camera else None  # (k, H, W, 3) uint8
            actions = policy.act(obs, task_ids[:len(active)], greedy, pixels)  # (k, A), padded
            actions[:, task.action_dim:] = 0.0  # dimensions this task does not have
            if newest_version is not None:
                lag = max(newest_version() - policy.policy_version, 0)
                for i in active:
                    lags[i].append(lag)
            stepped = self._envs.step(active, actions[:, :task.action_dim])
            still = []
            for j, i in enumerate(active):
                buf, timesteps[i] = buffers[i], stepped[j]
                buf.observe(obs[j], pixels[j] if camera else None)
                buf.record(actions[j], timesteps[i])
                if timesteps[i].last():
                    last = timesteps[i].observation
                    buf.observe(flatten_observation(last, task, obs_dim),
                                last["pixels"] if camera else None)
                else:
                    still.append(i)
            active = still
        if newest_version is not None:
            self.staleness.update({episode_id: (float(np.mean(lag)), int(max(lag)))
                                   for episode_id, lag in zip(ids, lags) if lag})
        return [self._episode(buf, seed, episode_id, start_time, policy.policy_version, ctx)
                for buf, seed, episode_id in zip(buffers, seeds, ids)]

    def _episode(self, buf: EpisodeBuffer, seed: int, episode_id: str, start_time: float,
                 version: int, ctx: EpisodeContext) -> Episode:
        lineage = Lineage(run_id=ctx.run_id, cycle=ctx.cycle, policy_version=version,
                          actor_id=ctx.actor_id, task=ctx.task, episode_id=episode_id,
                          seed=seed, mode=ctx.mode, start_time=start_time, end_time=time.time())
        return buf.episode(self._spec, ctx.task_id, lineage)
