"""Shared, import-light types: the environment spec, episodes, batches and the Adder interface.

This module imports only the standard library, numpy and torch, so `policies/`, `learners/` and
`actors/` can use these types without pulling in Reverb or TensorFlow.

Step layout (RLDS-like, one record per observation): record t holds the observation o_t, the
action a_t chosen at o_t, the reward r_{t+1} and discount d_{t+1} that followed it, and the
policy_version that chose a_t. The final record T holds o_T with a zero action, zero reward and
`mask = 0` (no action was taken there). dm_env semantics: termination sets d_T = 0, truncation
keeps d_T = 1 so the learner bootstraps from o_T.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Mapping

import numpy as np
import torch

Observation = np.ndarray  # (obs_dim,) float32, the named observation arrays concatenated
Action = np.ndarray  # (action_dim,) float32, continuous, within [action_min, action_max]
PolicyVersion = int  # 0 is the uniform random policy; the learner publishes 1, 2, ...
Params = Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task's observation and action shapes."""

    name: str  # e.g. "dm_control:cartpole-swingup"
    obs_names: tuple[str, ...]  # names of the observation arrays, in concatenation order
    obs_sizes: tuple[int, ...]  # flattened size of each named array
    action_dim: int  # number of continuous action dimensions
    instruction: str = ""  # optional natural-language task description (language tokens)

    @property
    def obs_dim(self) -> int:
        return int(sum(self.obs_sizes))


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Shapes of what the environments emit and accept: the one source for networks and replay.

    Several tasks may differ in observation and action sizes: observations and actions are
    padded with zeros to the largest task's, and the network masks the padding per task id.
    """

    tasks: tuple[TaskSpec, ...]  # task id i is tasks[i]
    action_min: float  # lower bound of every action dimension
    action_max: float  # upper bound of every action dimension
    pixels_shape: tuple[int, ...] = ()  # (H, W, 3) uint8 camera image per step; () = no camera

    @property
    def obs_dim(self) -> int:
        """Padded observation size: the largest task's."""
        return max(t.obs_dim for t in self.tasks)

    @property
    def action_dim(self) -> int:
        """Padded action size: the largest task's."""
        return max(t.action_dim for t in self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @classmethod
    def single(cls, name: str, obs_names: tuple[str, ...], obs_sizes: tuple[int, ...],
               action_dim: int, action_min: float = -1.0, action_max: float = 1.0) -> "EnvSpec":
        return cls((TaskSpec(name, tuple(obs_names), tuple(obs_sizes), action_dim),),
                   action_min, action_max)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EnvSpec":
        tasks = tuple(TaskSpec(t["name"], tuple(t["obs_names"]),
                               tuple(int(s) for s in t["obs_sizes"]), int(t["action_dim"]),
                               str(t.get("instruction", "")))
                      for t in d["tasks"])
        return cls(tasks, float(d["action_min"]), float(d["action_max"]),
                   tuple(int(s) for s in d.get("pixels_shape", ())))


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where an episode came from: enough to find the policy and data that produced it."""

    run_id: str  # the run directory's id
    cycle: int  # collect-and-infer cycle that collected the episode
    policy_version: PolicyVersion  # version that chose every action of the episode
    actor_id: str  # "actor-<i>" for sim actors, "robot-<id>" for robots
    task: str  # environment name, e.g. "dm_control:cartpole-swingup"
    episode_id: str  # uuid4 hex
    seed: int  # environment seed of the episode
    mode: str  # "collect" (goes to replay) or "eval" (greedy, archived only)
    start_time: float  # unix seconds
    end_time: float  # unix seconds


@dataclasses.dataclass(frozen=True)
class Episode:
    """One finished episode as T+1 step records (see module docstring)."""

    lineage: Lineage
    task_id: int
    observation: np.ndarray  # (T+1, obs_dim) float32
    action: np.ndarray  # (T+1, action_dim) float32; row T is zeros
    reward: np.ndarray  # (T+1,) float32; reward[t] = r_{t+1}; reward[T] = 0
    discount: np.ndarray  # (T+1,) float32; discount[t] = d_{t+1}; discount[T] = 0
    policy_version: np.ndarray  # (T+1,) int64
    terminated: bool  # the last transition ended the task (discount 0)
    truncated: bool  # the time limit ended the episode (discount 1)
    pixels: np.ndarray | None = None  # (T+1, H, W, 3) uint8 camera images; None without camera

    @property
    def length(self) -> int:
        """Number of transitions T."""
        return int(self.reward.shape[0]) - 1

    @property
    def episode_return(self) -> float:
        return float(self.reward[:-1].sum())

    @property
    def mask(self) -> np.ndarray:
        """(T+1,) float32: 1 where an action was taken, 0 on the final record."""
        m = np.ones(self.length + 1, np.float32)
        m[-1] = 0.0
        return m


@dataclasses.dataclass(frozen=True)
class Batch:
    """A learner batch of (n+1)-step sequence items, as torch tensors."""

    observation: torch.Tensor  # (B, n+1, obs_dim) float32
    action: torch.Tensor  # (B, n+1, action_dim) float32
    reward: torch.Tensor  # (B, n+1) float32
    discount: torch.Tensor  # (B, n+1) float32
    mask: torch.Tensor  # (B, n+1) float32, 1 where the record has an action
    task_id: torch.Tensor  # (B,) int64
    policy_version: torch.Tensor  # (B,) int64, version that chose the first action
    pixels: torch.Tensor | None = None  # (B, n+1, H, W, 3) uint8; None without camera

    def map(self, fn) -> "Batch":
        """Applies fn to every tensor field (None fields stay None)."""
        return Batch(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                        for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))


class Adder(abc.ABC):
    """Writes finished episodes into replay.

    Usage:
        adder.add_episode(episode)   # items become sampleable when this returns
    """

    # True when writing an episode replay already holds is a no-op (keyed by episode id), so a
    # retry of an archived episode may be sent again (replay.ingest.EpisodeSink); such an adder
    # also answers `holds`.
    idempotent: bool = False

    def holds(self, episode_id: str) -> bool:
        """Whether replay holds the episode; only idempotent adders know."""
        raise NotImplementedError

    @abc.abstractmethod
    def add_episode(self, episode: Episode, priorities: np.ndarray | None = None) -> int:
        """Writes the episode's sequence items (one per transition, with the given (T,)
        priorities or 1 each); returns how many items were written."""

    def close(self) -> None:
        """Releases connections; the default has none."""
