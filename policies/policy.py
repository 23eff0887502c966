"""Inference policies: the uniform random policy of cycle 0 and the PAC network policy."""

from __future__ import annotations

import logging
import warnings
from typing import Protocol

import numpy as np
import torch

from policies.perceiver import PerceiverActorCritic, PerceiverConfig
from policies.snapshot import Snapshot, SnapshotError
from replay.spec import EnvSpec, PolicyVersion

log = logging.getLogger(__name__)


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


class PolicyLogits(torch.nn.Module):
    """observation (B, obs_dim), task_id (B,)[, pixels (B, H, W, 3)] -> policy logits (B, A, K):
    the part of the network acting needs, as one module (to trace)."""

    def __init__(self, model: PerceiverActorCritic):
        super().__init__()
        self.model = model

    def forward(self, observation: torch.Tensor, task_id: torch.Tensor,
                pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.policy_logits(self.model.encode(observation, task_id, pixels))


def trace_policy_logits(model: PerceiverActorCritic, *example: torch.Tensor
                        ) -> torch.jit.ScriptModule:
    """PolicyLogits as a frozen TorchScript trace for the example's shapes (batch size
    included): no Python per operation, which is most of a small network's cost on a CPU
    (tiny preset, batch 1: about half; docs/benchmarks.md). The weights are copied in: the
    trace does not follow later changes to `model`."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes become constants
        traced = torch.jit.trace(PolicyLogits(model).eval(), example, check_trace=False)
        return torch.jit.freeze(traced)


# Traces copy the weights and help where Python dominates: small networks, few batch sizes.
TRACE_MAX_PARAMETERS = 20_000_000  # larger networks run eagerly (their compute dominates)
TRACE_MAX_SHAPES = 8  # batch sizes traced per policy; others run eagerly (a gateway's batches)


class PACPolicy:
    """Samples (or, greedy, takes the per-dimension mode of) the PAC policy head.

    A network of up to TRACE_MAX_PARAMETERS runs as a frozen trace per batch size and camera
    (trace_policy_logits), made at its first use; a policy is one version, so its model must
    not change after it acts."""

    def __init__(self, model: PerceiverActorCritic, policy_version: PolicyVersion, seed: int):
        self.model = model.eval()
        self.policy_version = policy_version
        self._generator = torch.Generator().manual_seed(seed)
        self._traced = sum(p.numel() for p in model.parameters()) <= TRACE_MAX_PARAMETERS
        self._logits: dict[tuple[int, bool], torch.nn.Module] = {}

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

    def _policy_logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = (inputs[0].shape[0], len(inputs) == 3)
        module = self._logits.get(key)
        if module is None:
            module = PolicyLogits(self.model)
            if self._traced and len(self._logits) < TRACE_MAX_SHAPES:
                try:
                    module = trace_policy_logits(self.model, *inputs)
                except Exception as e:  # an operation TorchScript cannot trace: run eagerly
                    log.warning("policy runs untraced: %s", e)
            self._logits[key] = module
        return module(*inputs)

    @torch.inference_mode()
    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        obs = torch.from_numpy(np.ascontiguousarray(observation, np.float32))
        task = torch.from_numpy(np.asarray(task_id, np.int64))
        inputs = (obs, task) if pixels is None else \
            (obs, task, torch.from_numpy(np.ascontiguousarray(pixels)))
        logits = self._policy_logits(*inputs)  # (B, A, K)
        if greedy:
            bins = logits.argmax(-1)
        else:
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])  # (B*A, K)
            bins = torch.multinomial(probs, 1, generator=self._generator).view(logits.shape[:-1])
        return self.model.bins_to_action(bins).numpy()
