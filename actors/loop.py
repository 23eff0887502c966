"""The acting loop: K environments stepped together with one batched policy call per step.

Episodes run in waves of up to K (one per environment). The policy is fixed for a wave, so a
policy version changes only at episode boundaries.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Sequence

import numpy as np

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


class _EpisodeBuffer:
    def __init__(self) -> None:
        self.observations: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.discounts: list[float] = []
        self.pixels: list[np.ndarray] = []

    def observe(self, observation: np.ndarray, pixels: np.ndarray | None) -> None:
        self.observations.append(observation)
        if pixels is not None:
            self.pixels.append(pixels)


class EnvironmentLoop:
    """Runs episodes on a fixed list of environments.

    Usage:
        loop = EnvironmentLoop(envs, spec)
        episodes = loop.run(policy, seeds=[1, 2], context=ctx, greedy=False)
    """

    def __init__(self, envs: Sequence[SeededEnvironment], spec: EnvSpec):
        self._envs, self._spec = list(envs), spec

    def run(self, policy: Policy, seeds: Sequence[int], context: EpisodeContext,
            greedy: bool) -> list[Episode]:
        """One episode per seed, in waves of len(envs); returns them in seed order."""
        episodes: list[Episode] = []
        k = len(self._envs)
        for start in range(0, len(seeds), k):
            episodes.extend(self._wave(policy, seeds[start:start + k], context, greedy))
        return episodes

    def _wave(self, policy: Policy, seeds: Sequence[int], ctx: EpisodeContext,
              greedy: bool) -> list[Episode]:
        envs = self._envs[:len(seeds)]
        start_time = time.time()
        for env, seed in zip(envs, seeds):
            env.seed(seed)
        timesteps = [env.reset() for env in envs]
        buffers = [_EpisodeBuffer() for _ in envs]
        active = list(range(len(envs)))
        task_ids = np.full(len(envs), ctx.task_id, np.int64)
        task, obs_dim = self._spec.tasks[ctx.task_id], self._spec.obs_dim
        camera = bool(self._spec.pixels_shape)
        while active:
            obs = np.stack([flatten_observation(timesteps[i].observation, task, obs_dim)
                            for i in active])  # (k, obs_dim), zero-padded
            pixels = np.stack([timesteps[i].observation["pixels"] for i in active]) \
                if camera else None  # (k, H, W, 3) uint8
            actions = policy.act(obs, task_ids[:len(active)], greedy, pixels)  # (k, A), padded
            actions[:, task.action_dim:] = 0.0  # dimensions this task does not have
            still = []
            for j, i in enumerate(active):
                buf = buffers[i]
                buf.observe(obs[j], pixels[j] if camera else None)
                buf.actions.append(actions[j].astype(np.float32))
                timesteps[i] = envs[i].step(actions[j, :task.action_dim])
                buf.rewards.append(float(timesteps[i].reward))
                buf.discounts.append(float(timesteps[i].discount))
                if timesteps[i].last():
                    last = timesteps[i].observation
                    buf.observe(flatten_observation(last, task, obs_dim),
                                last["pixels"] if camera else None)
                else:
                    still.append(i)
            active = still
        return [self._episode(buf, seed, start_time, policy.policy_version, ctx)
                for buf, seed in zip(buffers, seeds)]

    def _episode(self, buf: _EpisodeBuffer, seed: int, start_time: float, version: int,
                 ctx: EpisodeContext) -> Episode:
        T = len(buf.actions)
        terminated = buf.discounts[-1] == 0.0
        lineage = Lineage(run_id=ctx.run_id, cycle=ctx.cycle, policy_version=version,
                          actor_id=ctx.actor_id, task=ctx.task, episode_id=uuid.uuid4().hex,
                          seed=seed, mode=ctx.mode, start_time=start_time, end_time=time.time())
        return Episode(
            lineage=lineage, task_id=ctx.task_id,
            observation=np.stack(buf.observations).astype(np.float32),
            action=np.concatenate([np.stack(buf.actions),
                                   np.zeros((1, self._spec.action_dim), np.float32)]),
            reward=np.array(buf.rewards + [0.0], np.float32),
            discount=np.array(buf.discounts + [0.0], np.float32),
            policy_version=np.full(T + 1, version, np.int64),
            terminated=terminated, truncated=not terminated,
            pixels=np.stack(buf.pixels) if buf.pixels else None,
        )
