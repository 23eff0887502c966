"""Data-parallel training: gradients averaged over the default torch.distributed process group.

This is DistributedDataParallel's rule (every replica applies the mean gradient, so replicas
that start equal stay equal), applied explicitly after `backward()`: the PAC step calls the
network through several methods rather than one `forward()`, which DDP's hooks rely on.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from policies.normalization import BatchMoments


def allreduce_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Replaces each parameter's gradient by its mean over all ranks (missing grads count as 0)."""
    params = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all parameters
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def allreduce_moments(moments: BatchMoments) -> BatchMoments:
    """Sums every rank's batch observation moments, so all replicas merge the same statistics."""
    flat = torch.cat([moments.count, moments.total.reshape(-1), moments.total_sq.reshape(-1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    T, D = moments.total.shape
    return BatchMoments(flat[:T], flat[T:T + T * D].view(T, D), flat[T + T * D:].view(T, D))


def parameter_checksum(module: torch.nn.Module) -> float:
    """A float that differs between replicas whose weights differ (for tests and health checks)."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(module.parameters())))
