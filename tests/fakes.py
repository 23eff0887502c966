"""Spec-driven fakes for unit tests of single functions (no Ray, Reverb or gRPC)."""

import dataclasses
import itertools
import uuid

import numpy as np
import torch

from policies.perceiver import PerceiverConfig
from replay.spec import Batch, EnvSpec, Episode, Lineage

SPEC = EnvSpec.single("dm_control:fake-task", ("position", "velocity"), (3, 2), 2)
PIXEL_SPEC = dataclasses.replace(SPEC, pixels_shape=(16, 16, 3))  # with a 16x16 camera
TINY_MODEL = PerceiverConfig(num_latents=4, width=16, depth=1, num_heads=2, num_action_bins=5,
                             num_value_bins=11, v_min=0.0, v_max=10.0)


def make_episode(length: int = 4, version: int = 1, terminated: bool = False, seed: int = 0,
                 spec: EnvSpec = SPEC, cycle: int = 0, mode: str = "collect") -> Episode:
    rng = np.random.default_rng(seed)
    T = length
    action = rng.uniform(-1, 1, (T + 1, spec.action_dim)).astype(np.float32)
    action[-1] = 0
    reward = rng.uniform(0, 1, T + 1).astype(np.float32)
    reward[-1] = 0
    discount = np.ones(T + 1, np.float32)
    discount[-1] = 0
    if terminated:
        discount[-2] = 0
    lineage = Lineage(run_id="run", cycle=cycle, policy_version=version, actor_id="actor-0",
                      task=spec.task_names[0], episode_id=uuid.uuid4().hex, seed=seed, mode=mode,
                      start_time=1.0, end_time=2.0)
    return Episode(lineage=lineage, task_id=0,
                   observation=rng.normal(size=(T + 1, spec.obs_dim)).astype(np.float32),
                   action=action, reward=reward, discount=discount,
                   policy_version=np.full(T + 1, version, np.int64),
                   terminated=terminated, truncated=not terminated,
                   pixels=rng.integers(0, 256, (T + 1, *spec.pixels_shape), dtype=np.uint8)
                   if spec.pixels_shape else None)


def random_batches(batch_size: int, n_step: int = 2, spec: EnvSpec = SPEC, seed: int = 0):
    """An endless iterator of random, well-formed batches."""
    g = torch.Generator().manual_seed(seed)
    for _ in itertools.count():
        L = n_step + 1
        yield Batch(observation=torch.randn(batch_size, L, spec.obs_dim, generator=g),
                    action=torch.rand(batch_size, L, spec.action_dim, generator=g) * 2 - 1,
                    reward=torch.rand(batch_size, L, generator=g),
                    discount=torch.ones(batch_size, L), mask=torch.ones(batch_size, L),
                    task_id=torch.zeros(batch_size, dtype=torch.long),
                    policy_version=torch.zeros(batch_size, dtype=torch.long),
                    pixels=torch.randint(0, 256, (batch_size, L, *spec.pixels_shape),
                                         generator=g, dtype=torch.uint8)
                    if spec.pixels_shape else None)
