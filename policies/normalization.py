"""Observation normalisation and magnitude-preserving scalar features, for the PAC tokenizer.

Running statistics are kept per task and per observation dimension, merged batch by batch with
Chan et al.'s parallel update (exact for any batch split, so data-parallel ranks can sum their
batch moments first). They live in the network's state dict: checkpoints and policy snapshots
carry them, and acting applies exactly what the learner used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class BatchMoments(NamedTuple):
    """Sums over a batch, per task: adding two of these is the moments of the joined batch."""

    count: torch.Tensor  # (T,) float64 observations of each task
    total: torch.Tensor  # (T, O) float64 Σ x
    total_sq: torch.Tensor  # (T, O) float64 Σ x²


def batch_moments(observation: torch.Tensor, task_id: torch.Tensor,
                  num_tasks: int) -> BatchMoments:
    """observation (B, O), task_id (B,) int -> per-task sums (T,), (T, O), (T, O)."""
    x = observation.detach().to(torch.float64)
    index = task_id.long().unsqueeze(1).expand_as(x)  # (B, O)
    total = torch.zeros(num_tasks, x.shape[1], dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    count = torch.zeros(num_tasks, dtype=torch.float64, device=x.device)
    count.index_add_(0, task_id.long(), torch.ones_like(x[:, 0]))
    return BatchMoments(count, total.scatter_add_(0, index, x),
                        total_sq.scatter_add_(0, index, x * x))


def merge_moments(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  batch: BatchMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al. (1979): running (n_a, μ_a, σ²_a) ⊕ batch sums -> (n, μ, σ²), per task.

    A task with no observations in the batch keeps its statistics; a task seen for the first
    time takes the batch's. Shapes: count (T,), mean and var (T, O).
    """
    n_b = batch.count.unsqueeze(1)  # (T, 1)
    mean_b = batch.total / n_b.clamp_min(1.0)  # (T, O)
    var_b = (batch.total_sq / n_b.clamp_min(1.0) - mean_b ** 2).clamp_min(0.0)
    n_a = count.unsqueeze(1)
    n = n_a + n_b
    delta = mean_b - mean
    w_b = torch.where(n > 0, n_b / n.clamp_min(1.0), torch.zeros_like(n))  # (T, 1)
    new_mean = mean + delta * w_b
    m2 = var * n_a + var_b * n_b + delta ** 2 * n_a * w_b  # Σ (x - μ)² of the union
    new_var = torch.where(n > 0, m2 / n.clamp_min(1.0), var)
    return n.squeeze(1), new_mean, new_var


class ObservationNormalizer(nn.Module):
    """(x - μ_task) / σ_task, per dimension, clipped to ±clip; identity until the first update."""

    def __init__(self, num_tasks: int, obs_dim: int, clip: float = 50.0, min_std: float = 1e-3):
        super().__init__()
        self.clip, self.min_std = clip, min_std
        self.register_buffer("count", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(num_tasks, obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(num_tasks, obs_dim, dtype=torch.float64))

    def forward(self, observation: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """(B, O), (B,) -> normalised (B, O) in the observation's dtype."""
        mean = self.mean[task_id].to(observation.dtype)  # (B, O)
        std = self.var[task_id].sqrt().clamp_min(self.min_std).to(observation.dtype)
        return ((observation - mean) / std).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, moments: BatchMoments) -> None:
        count, mean, var = merge_moments(self.count, self.mean, self.var, moments)
        self.count.copy_(count)
        self.mean.copy_(mean)
        self.var.copy_(var)


def fourier_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Scalars (...,) -> (..., 1 + 2F): [f_0·x, sin(f·x), cos(f·x)] for each frequency f (F,).

    Unlike a linear map, these keep magnitude after LayerNorm: 5, 10 and 20 land on different
    sin/cos patterns rather than on the same direction scaled. The linear term (scaled by the
    lowest frequency f_0, so it cannot drown the unit-sized sin/cos terms) keeps the order.
    """
    angles = x.unsqueeze(-1) * frequencies  # (..., F)
    return torch.cat([angles[..., :1], angles.sin(), angles.cos()], dim=-1)


def geometric_frequencies(num: int, lowest: float, highest: float) -> torch.Tensor:
    """`num` frequencies spaced geometrically from `lowest` to `highest` (radians per unit)."""
    if num == 1:
        return torch.tensor([lowest])
    ratio = math.log(highest / lowest) / (num - 1)
    return torch.tensor([lowest * math.exp(ratio * i) for i in range(num)])
