"""PAC loss pieces as pure functions (notes/pac.md §1.3, §8.4).

    L(θ) = (1-α)·L_imp + α·L_bc + β·L_Q + L_eta

L_imp: weighted NLL of N actions sampled from the target policy π_θ', weights softmax(Q/η).
L_bc:  NLL of the dataset action (KL to the behaviour policy up to a constant).
L_Q:   cross-entropy from the target return distribution Γ_θ' to the critic p_θ.
L_eta: the MPO temperature dual g(η) = η·ε + η·E_s[log E_a[exp(Q/η)]], gradient to η only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def categorical_log_prob(logits: torch.Tensor, bins: torch.Tensor,
                         action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Factorised categorical log-probability.

    Args:
        logits: (..., A, K) per-dimension bin logits.
        bins: (..., A) int64 chosen bin per dimension.
        action_mask: broadcastable to (..., A); 0 on padded dimensions, which are left out.
    Returns:
        (...) log π(a) = Σ_d log Cat(a_d; logits_d).
    """
    log_probs = logits.log_softmax(-1).expand(*bins.shape, logits.shape[-1])  # broadcast
    logp = log_probs.gather(-1, bins.unsqueeze(-1)).squeeze(-1)  # (..., A)
    if action_mask is not None:
        logp = logp * action_mask
    return logp.sum(-1)


class NStepReturn(NamedTuple):
    partial_return: torch.Tensor  # (B,) Σ_{k<m} γ^k (Π_{j<k} d_j) r_k
    bootstrap_discount: torch.Tensor  # (B,) γ^m Π_{k<m} d_k (0 after termination)
    bootstrap_index: torch.Tensor  # (B,) int64 m, the record to bootstrap from


def n_step_return(reward: torch.Tensor, discount: torch.Tensor, mask: torch.Tensor,
                  gamma: float) -> NStepReturn:
    """n-step return of sequence items whose transitions may stop early at an episode end.

    Args:
        reward, discount, mask: (B, n) for the first n records of an (n+1)-record item; mask is a
            prefix of ones (transitions that exist) followed by zeros (past the episode's end).
        gamma: the discount factor.
    Termination has d = 0, so nothing is bootstrapped; truncation has d = 1 and bootstraps from
    the final observation, which is record m.
    """
    step_discount = torch.where(mask > 0, gamma * discount, torch.ones_like(discount))  # (B, n)
    cumulative = torch.cumprod(step_discount, dim=1)  # (B, n): Π_{j<=k}
    before = torch.cat([torch.ones_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)  # Π_{j<k}
    partial_return = (before * reward * mask).sum(1)
    return NStepReturn(partial_return, cumulative[:, -1], mask.sum(1).long())


def categorical_projection(atoms: torch.Tensor, probs: torch.Tensor,
                           support: torch.Tensor) -> torch.Tensor:
    """C51 projection of a distribution on moved atoms back onto the fixed support.

    Args:
        atoms: (B, M) target atom positions, e.g. G + D·z.
        probs: (B, M) probability of each atom.
        support: (M,) evenly spaced fixed support z.
    Returns:
        (B, M) probabilities on `support`; each row sums to its input's mass and, when no atom
        is clipped, keeps its mean.
    """
    v_min, v_max, M = support[0], support[-1], support.shape[0]
    delta = (v_max - v_min) / (M - 1)
    b = (atoms.clamp(v_min, v_max) - v_min) / delta  # (B, M) fractional index
    lower, upper = b.floor().long(), b.ceil().long()
    w_upper = b - lower  # mass share going to the upper neighbour
    w_lower = 1.0 - w_upper  # when lower == upper, w_lower = 1 keeps the whole mass
    out = torch.zeros_like(probs)
    out.scatter_add_(1, lower, probs * w_lower)
    out.scatter_add_(1, upper.clamp(max=M - 1), probs * w_upper)
    return out


def hl_gauss_projection(target: torch.Tensor, support: torch.Tensor,
                        sigma: float) -> torch.Tensor:
    """HL-Gauss (Farebrother et al. 2024): a Gaussian N(target, sigma²) integrated over each bin.

    Args:
        target: (B,) scalar targets.
        support: (M,) evenly spaced bin centres; bins extend half a spacing beyond each end.
        sigma: the Gaussian's standard deviation.
    Returns:
        (B, M) probabilities that sum to 1 (the mass outside the outer edges is renormalised).
    """
    delta = support[1] - support[0]
    edges = torch.cat([support - delta / 2, support[-1:] + delta / 2])  # (M+1,)
    cdf = torch.special.ndtr((edges - target.unsqueeze(-1)) / sigma)  # (B, M+1)
    mass = cdf[:, 1:] - cdf[:, :-1]  # (B, M)
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)


def improvement_weights(q_sampled: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Self-normalised exp(Q/η) over the N samples: (B, N) -> (B, N), rows sum to 1."""
    return torch.softmax(q_sampled / temperature, dim=1)


def temperature_dual_loss(q_sampled: torch.Tensor, temperature: torch.Tensor,
                          epsilon: float) -> torch.Tensor:
    """MPO dual g(η) = η·ε + η·E_s[log mean_a exp(Q/η)]; Q is detached, the gradient goes to η."""
    q = q_sampled.detach()  # (B, N)
    log_mean_exp = torch.logsumexp(q / temperature, dim=1) - math.log(q.shape[1])  # (B,)
    return temperature * epsilon + temperature * log_mean_exp.mean()


def policy_improvement_loss(logits: torch.Tensor, sampled_bins: torch.Tensor,
                            weights: torch.Tensor,
                            action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_imp = -E_s Σ_i w_i log π_θ(a_i|s); logits (B, A, K), bins (B, N, A), weights (B, N)."""
    mask = None if action_mask is None else action_mask.unsqueeze(1)  # (B, 1, A)
    logp = categorical_log_prob(logits.unsqueeze(1), sampled_bins, mask)  # (B, N)
    return -(weights.detach() * logp).sum(1).mean()


def behaviour_cloning_loss(logits: torch.Tensor, data_bins: torch.Tensor,
                           action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_bc = -E log π_θ(a_t|s_t); logits (B, A, K), bins (B, A), action_mask (B, A)."""
    return -categorical_log_prob(logits, data_bins, action_mask).mean()


def critic_loss(q_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """L_Q = -E Σ_m Γ_m log p_θ,m; q_logits (B, M), target_probs (B, M) without gradient."""
    return -(target_probs.detach() * q_logits.log_softmax(-1)).sum(-1).mean()


def polyak_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """θ' <- (1-τ)·θ' + τ·θ, in place; τ = 1 is a hard copy."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o, tau)


def pac_loss(l_imp: torch.Tensor, l_bc: torch.Tensor, l_q: torch.Tensor, l_eta: torch.Tensor,
             alpha: float, beta: float) -> torch.Tensor:
    """The combined objective (1-α)·L_imp + α·L_bc + β·L_Q + L_eta."""
    return (1.0 - alpha) * l_imp + alpha * l_bc + beta * l_q + l_eta
