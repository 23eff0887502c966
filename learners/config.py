"""Learner configuration."""

from __future__ import annotations

import dataclasses
import enum


class CriticTarget(enum.Enum):
    """How the target return distribution Γ_θ' is put on the critic's support."""

    C51 = "c51"  # project the shifted next-state distribution (Bellemare et al. 2017)
    HL_GAUSS = "hl_gauss"  # a Gaussian around the scalar target (Farebrother et al. 2024)


class TargetUpdate(enum.Enum):
    """How the target network follows the online network."""

    PERIODIC = "periodic"  # hard copy every target_update_period steps
    POLYAK = "polyak"  # θ' <- (1-τ)θ' + τθ after every step


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """PAC optimisation settings (defaults from notes/pac.md §8.2, acme MPO where unstated)."""

    batch_size: int = 256  # sequence items per learner step
    learning_rate: float = 3e-4  # Adam step size for the network
    dual_learning_rate: float = 1e-2  # Adam step size for the temperature parameter
    max_grad_norm: float = 40.0  # global gradient-norm clip
    alpha: float = 0.0  # BC weight: 1 = behaviour cloning, 0 = full RL
    beta: float = 1.0  # critic loss weight
    epsilon: float = 0.1  # KL bound of the improved to the target policy, per action dimension
    init_temperature: float = 1.0  # initial eta
    # E-step: each action dimension's K bins are scored exactly, the other dimensions taken
    # from this many samples of π_θ' per state; Q is averaged over them (the bin's expected Q
    # under the other dimensions' policy). One action dimension: exact.
    num_context_samples: int = 1
    # Entropy floor per action dimension, in nats (0 = off): a learned multiplier keeps the
    # policy at least this random, for exploration in online cycles (ln K = uniform).
    min_entropy: float = 0.0
    discount: float = 0.99  # gamma
    target_update: TargetUpdate = TargetUpdate.PERIODIC  # periodic hard copy or Polyak averaging
    target_update_period: int = 100  # learner steps between hard copies (periodic)
    polyak_tau: float = 0.005  # averaging rate per step (polyak)
    critic_target: CriticTarget = CriticTarget.C51  # C51 projection or HL-Gauss
    hl_gauss_sigma: float = 0.75  # HL-Gauss standard deviation, in bin widths
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda"
    bf16_autocast: bool = True  # on CUDA: forward passes in bfloat16 autocast (losses in fp32)
    compile: bool = False  # torch.compile the network's encode/decode methods
    num_threads: int = 2  # torch intra-op threads on CPU (measure: pacflow bench learner)
    # A stored snapshot (its .json, a path or URI) whose weights a new run starts from, and
    # publishes as v1: fine-tuning a policy of an earlier run. "" = fresh weights.
    init_from: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"learner.alpha={self.alpha} must be in [0, 1]")
        if self.min_entropy < 0:
            raise ValueError(f"learner.min_entropy={self.min_entropy} must be >= 0")
        if self.beta < 0:
            raise ValueError(f"learner.beta={self.beta} must be >= 0")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"learner.discount={self.discount} must be in (0, 1]")
        if self.init_temperature <= 0 or self.epsilon <= 0:
            raise ValueError("learner.init_temperature and learner.epsilon must be > 0")
        for name in ("batch_size", "num_context_samples", "target_update_period", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"learner.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.polyak_tau <= 1.0:
            raise ValueError(f"learner.polyak_tau={self.polyak_tau} must be in (0, 1]")
        if self.hl_gauss_sigma <= 0:
            raise ValueError(f"learner.hl_gauss_sigma={self.hl_gauss_sigma} must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"learner.device={self.device!r} must be one of auto, cpu, cuda")
