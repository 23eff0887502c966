"""PAC loss pieces as pure functions (notes/pac.md §1.3, §8.4).

    L(θ) = (1-α)·L_imp + α·L_bc + β·L_Q + L_eta

L_imp: cross-entropy from the improved policy π_imp ∝ π_θ'·exp(Q/η) to π_θ. The policy is a
       factorised categorical, so π_imp is computed exactly over each dimension's K bins (the
       other dimensions taken from π_θ'), not from N samples: a sampled E-step never scores the
       bins π_θ' rarely draws, and their probability can then only fall (support collapse).
L_bc:  NLL of the dataset action (KL to the behaviour policy up to a constant).
L_Q:   cross-entropy from the target return distribution Γ_θ' to the critic p_θ.
L_H:   optional entropy floor on π_θ (a Lagrangian, `entropy_floor_loss`): keeps the policy
       stochastic enough to explore in online cycles; off (H_min = 0) by default.
L_eta: the MPO temperature dual g(η) = η·ε + η·E_{s,d}[log E_{k~π_θ',d}[exp(Q/η)]], grad to η.
"""

from __future__ import annotations

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


def per_dimension_candidates(context_bins: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Every bin of every dimension, each with the other dimensions from a context action.

    Args:
        context_bins: (B, N, A) int64 actions, e.g. N samples from π_θ'.
        num_bins: K.
    Returns:
        (B, N, A, K, A): entry [b, n, d, k] is context n with dimension d set to bin k.
    """
    B, N, A = context_bins.shape
    out = context_bins[:, :, None, None, :].expand(B, N, A, num_bins, A).clone()
    dims = torch.arange(A, device=context_bins.device)
    bins = torch.arange(num_bins, device=context_bins.device)
    out[:, :, dims, :, dims] = bins.expand(B, N, A, num_bins).permute(2, 0, 1, 3)
    return out


def improved_log_probs(prior_logits: torch.Tensor, q: torch.Tensor,
                       temperature: torch.Tensor) -> torch.Tensor:
    """E-step, exact over each dimension's bins: log π_imp,d(k|s) ∝ log π_θ',d(k|s) + Q_d(s,k)/η.

    Args:
        prior_logits: (B, A, K) logits of the target policy π_θ'.
        q: (B, A, K) Q of each bin of each dimension (other dimensions from π_θ').
        temperature: η > 0.
    Returns:
        (B, A, K) normalised log-probabilities. Every bin is scored, so a bin that π_θ' rarely
        draws still gains probability when its Q is high (a sampled E-step never sees it).
    """
    return (prior_logits.log_softmax(-1) + q / temperature).log_softmax(-1)


def temperature_dual_loss(prior_logits: torch.Tensor, q: torch.Tensor, temperature: torch.Tensor,
                          epsilon: float, action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MPO dual per dimension: g(η) = η·ε + η·E_{s,d}[log Σ_k π_θ',d(k|s) exp(Q_d(s,k)/η)].

    Minimising g over η keeps the mean per-dimension KL(π_imp,d || π_θ',d) near ε, so the joint
    KL over A dimensions is about A·ε. prior_logits and
    q (B, A, K) are detached; the gradient goes to η only. action_mask (B, A) leaves out padding.
    """
    log_prior, q = prior_logits.detach().log_softmax(-1), q.detach()
    log_mean_exp = torch.logsumexp(log_prior + q / temperature, dim=-1)  # (B, A)
    return temperature * epsilon + temperature * _masked_mean_over_dims(log_mean_exp, action_mask)


def policy_improvement_loss(logits: torch.Tensor, improved_log_probs: torch.Tensor,
                            action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """M-step: L_imp = -E_s Σ_d Σ_k π_imp,d(k|s) log π_θ,d(k|s), i.e. KL(π_imp || π_θ) + const.

    logits (B, A, K); improved_log_probs (B, A, K), without gradient; action_mask (B, A).
    """
    cross_entropy = -(improved_log_probs.detach().exp() * logits.log_softmax(-1)).sum(-1)
    if action_mask is not None:
        cross_entropy = cross_entropy * action_mask
    return cross_entropy.sum(-1).mean()


def _masked_mean_over_dims(x: torch.Tensor, action_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, A) -> scalar: the mean over states and the task's own dimensions."""
    if action_mask is None:
        return x.mean()
    return (x * action_mask).sum() / action_mask.sum().clamp_min(1.0)


def categorical_kl(log_p: torch.Tensor, logits_q: torch.Tensor,
                   action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-dimension KL(p || q); log_p (B, A, K) normalised, logits_q (B, A, K)."""
    kl = (log_p.exp() * (log_p - logits_q.log_softmax(-1))).sum(-1)  # (B, A)
    return _masked_mean_over_dims(kl, action_mask)


def categorical_entropy(logits: torch.Tensor,
                        action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-dimension entropy of the policy, in nats; logits (B, A, K)."""
    log_p = logits.log_softmax(-1)
    return _masked_mean_over_dims(-(log_p.exp() * log_p).sum(-1), action_mask)


def entropy_floor_loss(logits: torch.Tensor, multiplier: torch.Tensor, min_entropy: float,
                       action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A lower bound on the policy's entropy, H̄ >= H_min, as a Lagrangian (the M-step analogue
    of SAC's entropy target): λ·(H_min − H̄) with λ >= 0 learned by dual descent. H̄ is the mean
    over states and action dimensions (one multiplier for all dimensions).

    The first term's gradient (λ fixed) raises the policy's entropy; the second's (H fixed)
    raises λ while the entropy is below H_min and lowers it above. Their values cancel, so the
    loss adds nothing to the reported total. logits (B, A, K); multiplier λ > 0.
    """
    entropy = categorical_entropy(logits, action_mask)
    return multiplier.detach() * (min_entropy - entropy) + \
        multiplier * (entropy.detach() - min_entropy)


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
