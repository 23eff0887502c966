"""A plain MLP behaviour-cloning policy: the yardstick that pacflow's BC (α=1, β=0) must match.

It sees the same data as the PAC learner (each step's observation and its action's nearest bin),
is trained for the same number of updates at the same batch size, and acts through the same
`Policy` interface, so the only difference left is the network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MLPBehaviourCloning(nn.Module):
    """obs -> 256 -> 256 -> per-dimension bin logits, on observations standardised with the
    dataset's mean and std (stored as buffers)."""

    def __init__(self, obs_dim: int, action_dim: int, num_bins: int, hidden: int = 256):
        super().__init__()
        self.action_dim, self.num_bins = action_dim, num_bins
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, action_dim * num_bins))
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """(B, O) -> logits (B, A, K)."""
        x = (observation - self.mean) / self.std
        return self.net(x).view(-1, self.action_dim, self.num_bins)


def train_mlp_bc(observations: np.ndarray, action_bins: np.ndarray, num_bins: int, steps: int,
                 batch_size: int, learning_rate: float = 3e-4,
                 seed: int = 0) -> MLPBehaviourCloning:
    """Cross-entropy on uniformly sampled (observation (N, O), bins (N, A)) pairs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    obs = torch.from_numpy(np.asarray(observations, np.float32))
    bins = torch.from_numpy(np.asarray(action_bins, np.int64))
    model = MLPBehaviourCloning(obs.shape[1], bins.shape[1], num_bins)
    model.mean.copy_(obs.mean(0))
    model.std.copy_(obs.std(0).clamp_min(1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        idx = torch.randint(0, len(obs), (batch_size,), generator=g)
        logits = model(obs[idx])  # (B, A, K)
        loss = nn.functional.cross_entropy(logits.reshape(-1, num_bins), bins[idx].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


class MLPPolicy:
    """`Policy` over an MLPBehaviourCloning network; greedy takes each dimension's mode."""

    policy_version = 0

    def __init__(self, model: MLPBehaviourCloning, bin_centres: np.ndarray, seed: int = 0):
        self.model, self._centres = model, torch.as_tensor(bin_centres, dtype=torch.float32)
        self._generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def act(self, observation: np.ndarray, task_id: np.ndarray, greedy: bool,
            pixels: np.ndarray | None = None) -> np.ndarray:
        logits = self.model(torch.from_numpy(np.ascontiguousarray(observation, np.float32)))
        if greedy:
            bins = logits.argmax(-1)
        else:
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
            bins = torch.multinomial(probs, 1, generator=self._generator).view(logits.shape[:-1])
        return self._centres[bins].numpy()
