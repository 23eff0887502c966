"""Perceiver-IO actor-critic (PAC, Springenberg et al. 2024), in one file.

    tokens: one per observation scalar (normalised per task and dimension, then Fourier features
            through a per-dimension projection), one per camera-image patch (if the spec has a
            camera), one per instruction byte (if the tasks have instructions), one task token
        └─ cross-attention from L learned latents ──▶ depth × self-attention blocks ──▶ z_M
    policy decoder: one learned query per action dimension cross-attends z_M ──▶ K bin logits
    Q decoder: a query built from the action (late fusion) cross-attends z_M ──▶ M value logits;
               each dimension adds a learned embedding of its bin plus a projection of the bin
               centre's Fourier features (ordinal: smooth across neighbouring bins)

The Q decoder's queries never attend to each other, so N candidate actions are scored in one call
as N queries against a single state encoding (the encoder runs once per state).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from policies.normalization import (ObservationNormalizer, fourier_features,
                                    geometric_frequencies)
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
    patch_size: int = 8  # camera images are cut into patch_size² patches, one token each
    num_obs_frequencies: int = 8  # F, Fourier frequencies per normalised observation scalar
    num_action_frequencies: int = 4  # Fourier frequencies of each action bin's centre (Q query)

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"model.width={self.width} must be divisible by "
                             f"model.num_heads={self.num_heads}")
        if self.num_action_bins < 2 or self.num_value_bins < 2:
            raise ValueError("model.num_action_bins and model.num_value_bins must be >= 2")
        if not self.v_min < self.v_max:
            raise ValueError(f"model.v_min={self.v_min} must be < model.v_max={self.v_max}")
        if self.patch_size < 1:
            raise ValueError(f"model.patch_size={self.patch_size} must be >= 1")
        if self.num_obs_frequencies < 1 or self.num_action_frequencies < 1:
            raise ValueError("model.num_obs_frequencies and model.num_action_frequencies must "
                             "be >= 1")


PAD_BYTE = 256  # instruction token id of padding (byte values are 0..255)


def instruction_ids(instructions: list[str]) -> torch.Tensor:
    """Byte-level tokens of each task's instruction, padded with PAD_BYTE: (num_tasks, Lt)."""
    encoded = [list(text.encode("utf-8")) for text in instructions]
    length = max(len(e) for e in encoded)
    return torch.tensor([e + [PAD_BYTE] * (length - len(e)) for e in encoded], dtype=torch.long)


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


def nearest_bins(action: torch.Tensor, low: float, high: float, num_bins: int) -> torch.Tensor:
    """Continuous actions (..., A) in [low, high] -> index of the nearest of `num_bins` evenly
    spaced bin centres (..., A) int64; out-of-range actions are clipped first."""
    scaled = (action.clamp(low, high) - low) / (high - low) * (num_bins - 1)
    return scaled.round().long()


class PerceiverActorCritic(nn.Module):
    """The PAC network: a shared Perceiver torso, a categorical policy and a categorical critic."""

    def __init__(self, spec: EnvSpec, config: PerceiverConfig):
        super().__init__()
        self.spec, self.config = spec, config
        W, A, K = config.width, spec.action_dim, config.num_action_bins
        block = lambda: Block(W, config.num_heads, config.mlp_ratio)  # noqa: E731
        # Tokenizers: normalised scalar -> Fourier features -> a projection of its own per
        # dimension (its bias is the dimension's learned embedding); a task token.
        D = spec.obs_dim
        self.normalizer = ObservationNormalizer(max(spec.num_tasks, 1), D)
        self.register_buffer("obs_frequencies",
                             geometric_frequencies(config.num_obs_frequencies, 0.125, 4.0),
                             persistent=False)
        num_features = 1 + 2 * config.num_obs_frequencies
        self.obs_projection = nn.Parameter(
            torch.randn(D, num_features, W) / math.sqrt(num_features))
        self.obs_position = nn.Parameter(torch.randn(D, W) * 0.02)
        self.task_embedding = nn.Embedding(max(spec.num_tasks, 1), W)
        self.image_stem = self._image_stem(spec, config)
        self.language = any(t.instruction for t in spec.tasks)
        if self.language:
            ids = instruction_ids([t.instruction for t in spec.tasks])  # (num_tasks, Lt)
            self.register_buffer("instruction_ids", ids, persistent=False)
            self.language_embedding = nn.Embedding(PAD_BYTE + 1, W)
            self.language_position = nn.Parameter(torch.randn(ids.shape[1], W) * 0.02)
        # Torso.
        self.latents = nn.Parameter(torch.randn(config.num_latents, W) * 0.02)
        self.encoder = block()
        self.blocks = nn.ModuleList(block() for _ in range(config.depth))
        # Policy decoder: one query per action dimension.
        self.policy_queries = nn.Parameter(torch.randn(A, W) * 0.02)
        self.policy_decoder = block()
        self.policy_head = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, K))
        # Q decoder: query = base + Σ_d [embedding of d's bin + projection of the bin centre's
        # Fourier features]; the second part is smooth in the bin centre, so neighbouring bins
        # share a component (the first is learned per bin and unordered).
        self.q_base = nn.Parameter(torch.randn(W) * 0.02)
        self.action_embedding = nn.Embedding(A * K, W)
        centres = torch.linspace(spec.action_min, spec.action_max, K)
        unit = (centres - centres.mean()) / (centres.max() - centres.mean())  # [-1, 1]
        freqs = math.pi * torch.arange(1, config.num_action_frequencies + 1) / 2
        self.register_buffer("bin_features", fourier_features(unit, freqs), persistent=False)
        num_action_features = self.bin_features.shape[1]
        self.action_projection = nn.Parameter(
            torch.randn(A, num_action_features, W) / math.sqrt(num_action_features))
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

    @staticmethod
    def _image_stem(spec: EnvSpec, config: PerceiverConfig) -> nn.Module | None:
        """A patch stem: a conv with kernel = stride = patch_size, then learned positions."""
        if not spec.pixels_shape:
            return None
        H, W_img, C = spec.pixels_shape
        p = config.patch_size
        if H % p or W_img % p:
            raise ValueError(f"model.patch_size={p} must divide the camera image size {H}x{W_img}")
        stem = nn.Module()
        stem.patches = nn.Conv2d(C, config.width, kernel_size=p, stride=p)
        stem.position = nn.Parameter(torch.randn((H // p) * (W_img // p), config.width) * 0.02)
        return stem

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Camera images (B, H, W, 3) uint8 -> one token per patch (B, P, W)."""
        x = pixels.permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (B, 3, H, W) in [-0.5, 0.5]
        x = self.image_stem.patches(x)  # (B, W, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.image_stem.position  # (B, P, W)

    def action_mask(self, task_id: torch.Tensor) -> torch.Tensor | None:
        """(B,) -> (B, A) float, 1 on the task's own action dimensions; None when no padding."""
        if not self.padded:
            return None
        dims = torch.arange(self.spec.action_dim, device=task_id.device)
        return (dims < self.task_action_dims[task_id].unsqueeze(1)).float()

    def encode(self, observation: torch.Tensor, task_id: torch.Tensor,
               pixels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, obs_dim) float, (B,) int, (B, H, W, 3) uint8 when the spec has a camera ->
        latent state encoding z_M (B, L, W)."""
        B, num_obs = observation.shape
        tokens = [self.observation_tokens(self.normalizer(observation, task_id))]  # (B, O, W)
        masks: list[torch.Tensor | None] = [None]  # True where a token may be attended
        if self.padded:  # only the task's own observation tokens
            positions = torch.arange(num_obs, device=observation.device)  # (O,)
            masks[0] = positions < self.task_obs_dims[task_id].unsqueeze(1)  # (B, O)
        if self.image_stem is not None:
            if pixels is None:
                raise ValueError("this model reads camera images: pass pixels (B, H, W, 3)")
            tokens.append(self.image_tokens(pixels))  # (B, P, W)
            masks.append(None)
        if self.language:
            ids = self.instruction_ids[task_id]  # (B, Lt)
            tokens.append(self.language_embedding(ids) + self.language_position)  # (B, Lt, W)
            masks.append(ids != PAD_BYTE)
        tokens.append(self.task_embedding(task_id).unsqueeze(1))  # (B, 1, W)
        masks.append(None)
        mask = None if all(m is None for m in masks) else torch.cat(
            [torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
             for t, m in zip(tokens, masks)], dim=1)  # (B, tokens)
        latents = self.latents.expand(B, -1, -1)
        z = self.encoder(latents, torch.cat(tokens, dim=1), mask)  # (B, L, W)
        for blk in self.blocks:
            z = blk(z)
        return z

    def observation_tokens(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised observations (B, O) -> one token per scalar (B, O, W)."""
        features = fourier_features(normalised, self.obs_frequencies)  # (B, O, 1+2F)
        return torch.einsum("bof,ofw->bow", features, self.obs_projection) + self.obs_position

    def action_table(self) -> torch.Tensor:
        """The query contribution of every (dimension, bin): (A*K, W)."""
        A, K = self.spec.action_dim, self.config.num_action_bins
        ordinal = torch.einsum("kf,afw->akw", self.bin_features, self.action_projection)
        return (self.action_embedding.weight.view(A, K, -1) + ordinal).reshape(A * K, -1)

    def policy_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, L, W) -> per-dimension bin logits (B, A, K)."""
        queries = self.policy_queries.expand(z.shape[0], -1, -1)  # (B, A, W)
        return self.policy_head(self.policy_decoder(queries, z))

    def q_logits(self, z: torch.Tensor, action_bins: torch.Tensor,
                 action_mask: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, L, W), action bins (B, N, A) int, action_mask (B, A) -> value logits (B, N, M)."""
        emb = F.embedding(action_bins + self.action_offsets, self.action_table())  # (B,N,A,W)
        if action_mask is not None:  # padded dimensions do not enter the query
            emb = emb * action_mask[:, None, :, None]
        queries = self.q_base + emb.sum(dim=2)  # (B, N, W)
        return self.q_head(self.q_decoder(queries, z))

    def q_value(self, q_logits: torch.Tensor) -> torch.Tensor:
        """Mean of the categorical return distribution: (..., M) -> (...)."""
        return (q_logits.softmax(-1) * self.value_support).sum(-1)

    def action_to_bins(self, action: torch.Tensor) -> torch.Tensor:
        """Continuous actions (..., A) -> nearest bin index (..., A) int64."""
        return nearest_bins(action, self.spec.action_min, self.spec.action_max,
                            self.config.num_action_bins)

    def bins_to_action(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin indices (..., A) -> bin centres (..., A) float32."""
        return self.bin_centres[bins]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_temperature_param(temperature: float) -> float:
    """Inverse softplus: the raw parameter psi for which softplus(psi) == temperature."""
    return temperature + math.log(-math.expm1(-temperature))
