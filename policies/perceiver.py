"""Perceiver-IO actor-critic (PAC, Springenberg et al. 2024), in one file.

    tokens (one per observation scalar + one task token)
        └─ cross-attention from L learned latents ──▶ depth × self-attention blocks ──▶ z_M
    policy decoder: one learned query per action dimension cross-attends z_M ──▶ K bin logits
    Q decoder: a query built from the action (late fusion) cross-attends z_M ──▶ M value logits

The Q decoder's queries never attend to each other, so N candidate actions are scored in one call
as N queries against a single state encoding (the encoder runs once per state).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from replay.spec import EnvSpec


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Size of the network and the discretisation of actions and values."""

    num_latents: int = 16  # L, learned latent queries
    width: int = 64  # W, token / latent width
    depth: int = 2  # self-attention blocks over the latents
    num_heads: int = 4  # attention heads (width must divide by it)
    mlp_ratio: int = 4  # hidden width of each MLP, as a multiple of width
    num_action_bins: int = 21  # K, uniform bins per action dimension
    num_value_bins: int = 51  # M, atoms of the categorical critic
    v_min: float = 0.0  # lowest return the critic can represent
    v_max: float = 100.0  # highest return the critic can represent

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"model.width={self.width} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        if self.num_action_bins < 2 or self.num_value_bins < 2:
            raise ValueError("model.num_action_bins and model.num_value_bins must be >= 2")
        if not self.v_min < self.v_max:
            raise ValueError(f"model.v_min={self.v_min} must be < model.v_max={self.v_max}")


# Size presets (parameter counts for cartpole's 5 observations and 1 action dimension; the
# count grows slightly with observation and action sizes).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_latents=8, width=64, depth=1, num_heads=4),  # ~0.2M, CPU tests and demo
    "small": dict(num_latents=32, width=256, depth=10, num_heads=8),  # ~10M
    "base": dict(num_latents=64, width=768, depth=11, num_heads=12),  # ~100M
    "large": dict(num_latents=128, width=1536, depth=32, num_heads=16),  # ~1B
}


class Attention(nn.Module):
    """Multi-head attention of queries x over context c (self-attention when c is x)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Lq, W), c (B, Lk, W), mask (B, Lk) bool: True where c may be attended."""
        B, Lq, W = x.shape
        Lk, H = c.shape[1], self.num_heads
        q = self.q(x).view(B, Lq, H, W // H).transpose(1, 2)  # (B, H, Lq, W/H)
        k, v = self.kv(c).view(B, Lk, 2, H, W // H).permute(2, 0, 3, 1, 4)  # 2 × (B, H, Lk, W/H)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, Lq, W/H)
        return self.proj(y.transpose(1, 2).reshape(B, Lq, W))


class Block(nn.Module):
    """Pre-norm attention + MLP residual block; cross-attends a context when one is given."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_x = nn.LayerNorm(width)
        self.ln_c = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_x(x)
        x = x + self.attn(h, h if context is None else self.ln_c(context), mask)
        return x + self.mlp(self.ln_mlp(x))


class PerceiverActorCritic(nn.Module):
    """The PAC network: a shared Perceiver torso, a categorical policy and a categorical critic."""

    def __init__(self, spec: EnvSpec, config: PerceiverConfig):
        super().__init__()
        self.spec, self.config = spec, config
        W, A, K = config.width, spec.action_dim, config.num_action_bins
        block = lambda: Block(W, config.num_heads, config.mlp_ratio)  # noqa: E731
        # Tokenizers: scalar value embedding + learned per-dimension embedding; a task token.
        self.obs_value = nn.Linear(1, W)
        self.obs_position = nn.Parameter(torch.randn(spec.obs_dim, W) * 0.02)
        self.task_embedding = nn.Embedding(max(spec.num_tasks, 1), W)
        # Torso.
        self.latents = nn.Parameter(torch.randn(config.num_latents, W) * 0.02)
        self.encoder = block()
        self.blocks = nn.ModuleList(block() for _ in range(config.depth))
        # Policy decoder: one query per action dimension.
        self.policy_queries = nn.Parameter(torch.randn(A, W) * 0.02)
        self.policy_decoder = block()
        self.policy_head = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, K))
        # Q decoder: query = base + sum over dimensions of an embedding of each dimension's bin.
        self.q_base = nn.Parameter(torch.randn(W) * 0.02)
        self.action_embedding = nn.Embedding(A * K, W)
        self.q_decoder = block()
        self.q_head = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, config.num_value_bins))
        self.register_buffer("action_offsets", torch.arange(A) * K, persistent=False)
        self.register_buffer("bin_centres", torch.linspace(spec.action_min, spec.action_max, K),
                             persistent=False)
        # Per-task sizes: tokens and action dimensions past a task's own are padding.
        self.register_buffer("task_obs_dims", torch.tensor([t.obs_dim for t in spec.tasks]),
                             persistent=False)
        self.register_buffer("task_action_dims",
                             torch.tensor([t.action_dim for t in spec.tasks]), persistent=False)
        self.padded = len({(t.obs_dim, t.action_dim) for t in spec.tasks}) > 1
        self.register_buffer("value_support",
                             torch.linspace(config.v_min, config.v_max, config.num_value_bins),
                             persistent=False)

    def action_mask(self, task_id: torch.Tensor) -> torch.Tensor | None:
        """(B,) -> (B, A) float, 1 on the task's own action dimensions; None when no padding."""
        if not self.padded:
            return None
        dims = torch.arange(self.spec.action_dim, device=task_id.device)
        return (dims < self.task_action_dims[task_id].unsqueeze(1)).float()

    def encode(self, observation: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim) float, (B,) int -> latent state encoding z_M (B, L, W)."""
        tokens = self.obs_value(observation.unsqueeze(-1)) + self.obs_position  # (B, O, W)
        task = self.task_embedding(task_id).unsqueeze(1)  # (B, 1, W)
        tokens = torch.cat([tokens, task], dim=1)  # (B, O+1, W)
        mask = None
        if self.padded:  # attend to the task's own observation tokens and the task token
            positions = torch.arange(tokens.shape[1], device=tokens.device)  # (O+1,)
            mask = (positions < self.task_obs_dims[task_id].unsqueeze(1)) \
                | (positions == tokens.shape[1] - 1)  # (B, O+1)
        latents = self.latents.expand(observation.shape[0], -1, -1)
        z = self.encoder(latents, tokens, mask)  # (B, L, W)
        for blk in self.blocks:
            z = blk(z)
        return z

    def policy_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, L, W) -> per-dimension bin logits (B, A, K)."""
        queries = self.policy_queries.expand(z.shape[0], -1, -1)  # (B, A, W)
        return self.policy_head(self.policy_decoder(queries, z))

    def q_logits(self, z: torch.Tensor, action_bins: torch.Tensor,
                 action_mask: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, L, W), action bins (B, N, A) int, action_mask (B, A) -> value logits (B, N, M)."""
        emb = self.action_embedding(action_bins + self.action_offsets)  # (B, N, A, W)
        if action_mask is not None:  # padded dimensions do not enter the query
            emb = emb * action_mask[:, None, :, None]
        queries = self.q_base + emb.sum(dim=2)  # (B, N, W)
        return self.q_head(self.q_decoder(queries, z))

    def q_value(self, q_logits: torch.Tensor) -> torch.Tensor:
        """Mean of the categorical return distribution: (..., M) -> (...)."""
        return (q_logits.softmax(-1) * self.value_support).sum(-1)

    def action_to_bins(self, action: torch.Tensor) -> torch.Tensor:
        """Continuous actions (..., A) -> nearest bin index (..., A) int64."""
        lo, hi, K = self.spec.action_min, self.spec.action_max, self.config.num_action_bins
        scaled = (action.clamp(lo, hi) - lo) / (hi - lo) * (K - 1)
        return scaled.round().long()

    def bins_to_action(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin indices (..., A) -> bin centres (..., A) float32."""
        return self.bin_centres[bins]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_temperature_param(temperature: float) -> float:
    """Inverse softplus: the raw parameter psi for which softplus(psi) == temperature."""
    return temperature + math.log(-math.expm1(-temperature))
