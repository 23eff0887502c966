"""Inference policies: the uniform random policy of cycle 0 and the PAC network policy."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from policies.perceiver import PerceiverActorCritic, PerceiverConfig
from policies.snapshot import Snapshot, SnapshotError
from replay.spec import EnvSpec, PolicyVersion


class Policy(Protocol):
    """Chooses actions for a batch of observations.

    Usage:
        actions = policy.act(observations, task_ids, greedy=False)   # (B, A) float32
    """

    policy_version: PolicyVersion

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        """observation (B, obs_dim) float32, task_id (B,) int, pixels (B, H, W, 3) uint8 when
        the spec has a camera -> actions (B, A) float32."""
        ...


class RandomPolicy:
    """Uniform over the action bins of every dimension: policy version 0."""

    policy_version: PolicyVersion = 0

    def __init__(self, spec: EnvSpec, num_action_bins: int, seed: int):
        self._centres = np.linspace(spec.action_min, spec.action_max, num_action_bins,
                                    dtype=np.float32)
        self._action_dim = spec.action_dim
        self._rng = np.random.default_rng(seed)

    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        bins = self._rng.integers(0, len(self._centres), (observation.shape[0], self._action_dim))
        return self._centres[bins]


class PACPolicy:
    """Samples (or, greedy, takes the per-dimension mode of) the PAC policy head."""

    def __init__(self, model: PerceiverActorCritic, policy_version: PolicyVersion, seed: int):
        self.model = model.eval()
        self.policy_version = policy_version
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, seed: int) -> "PACPolicy":
        spec = EnvSpec.from_dict(snapshot.metadata["env_spec"])
        model = PerceiverActorCritic(spec, PerceiverConfig(**snapshot.metadata["model_config"]))
        try:
            model.load_state_dict(snapshot.state_dict())
        except RuntimeError as e:  # missing or unexpected weights: another network layout
            raise SnapshotError(f"snapshot v{snapshot.version} does not fit this network "
                                f"(made by another pacflow version?): "
                                f"{str(e).splitlines()[0]}") from e
        return cls(model, snapshot.version, seed)

    @torch.inference_mode()
    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        obs = torch.from_numpy(np.ascontiguousarray(observation, np.float32))
        task = torch.from_numpy(np.asarray(task_id, np.int64))
        img = None if pixels is None else torch.from_numpy(np.ascontiguousarray(pixels))
        logits = self.model.policy_logits(self.model.encode(obs, task, img))  # (B, A, K)
        if greedy:
            bins = logits.argmax(-1)
        else:
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])  # (B*A, K)
            bins = torch.multinomial(probs, 1, generator=self._generator).view(logits.shape[:-1])
        return self.model.bins_to_action(bins).numpy()
