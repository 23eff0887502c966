"""Data-parallel PAC training on several GPUs (or CPU processes) through Ray Train.

`train_data_parallel` runs one TorchTrainer job: every worker builds the same learner (same seed,
restored from the newest good checkpoint when there is one), draws its own batches, and averages
gradients each step (learners/distributed.py), so the replicas stay identical. Rank 0 alone writes
the checkpoint and, when given a policy server address, publishes the snapshot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

from learners.checkpoints import load_latest_good, save_checkpoint
from learners.config import LearnerConfig
from learners.distributed import allreduce_gradients, allreduce_moments, parameter_checksum
from learners.learner import PACLearner
from policies.perceiver import PerceiverConfig
from policies.client import publish
from policies.security import ClientSecurity
from policies.snapshot import Snapshot, snapshot_metadata
from replay.spec import Batch, EnvSpec
from replay.storage import Storage, join


@dataclasses.dataclass(frozen=True)
class DataParallelJob:
    """One data-parallel training job; everything here is pickled to the workers."""

    spec: EnvSpec  # environment spec of the run
    model: PerceiverConfig  # network size
    learner: LearnerConfig  # optimisation settings; batch_size is per worker
    make_iterator: Callable[[int], Iterator[Batch]]  # rank -> that worker's batches
    num_steps: int  # updates in this job
    checkpoint_dir: str  # restored from when it holds a checkpoint; rank 0 writes to it
    seed: int = 0  # initialisation seed, the same on every rank
    cycle: int = 0  # recorded in the checkpoint and snapshot
    policy_address: str | None = None  # rank 0 publishes version `publish_version` here
    publish_version: int = 0  # the version to publish (when policy_address is set)
    policy_security: ClientSecurity = ClientSecurity()  # how rank 0 reaches the policy server
    metrics_path: str = ""  # rank 0 writes its metrics here (set by train_data_parallel)


def _train_loop(config: dict) -> None:
    job: DataParallelJob = config["job"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    learner = PACLearner(job.spec, job.model, job.learner, job.make_iterator(rank), job.seed,
                         gradient_hook=allreduce_gradients, moments_hook=allreduce_moments)
    state = load_latest_good(job.checkpoint_dir)
    if state is not None:
        learner.restore(state)
    torch.manual_seed(job.seed * 1000 + rank + learner.num_steps)  # own action samples per rank
    metrics = learner.run(job.num_steps)
    checksums: list = [None] * ctx.get_world_size()
    dist.all_gather_object(checksums, parameter_checksum(learner.model))
    if rank == 0:
        save_checkpoint(learner.state(), job.checkpoint_dir, learner.num_steps, job.cycle)
        if job.policy_address:
            meta = snapshot_metadata(job.spec.to_dict(), job.model, job.cycle,
                                     learner.num_steps, job.publish_version - 1)
            publish(job.policy_address,
                    Snapshot.from_state_dict(job.publish_version, learner.get_variables(), meta),
                    security=job.policy_security)
    result = {**metrics, "learner_steps": learner.num_steps, "replica_checksums": checksums}
    if rank == 0:  # Ray Train keeps only checkpointed reports; ours live in run storage
        Storage(job.metrics_path).put_bytes("", json.dumps(result).encode())
    ray.train.report(result)


def train_data_parallel(job: DataParallelJob, num_workers: int, use_gpu: bool,
                        storage_dir: str | Path, cpus_per_worker: float = 1.0,
                        max_failures: int = 0) -> dict:
    """Runs the job on `num_workers` Ray Train workers; returns rank 0's metrics.

    `storage_dir` (a local path or an object-store URI) is Ray Train's own storage_path, so the
    workers need no shared filesystem. A failed worker restarts the job from the newest good
    checkpoint up to `max_failures` times (Ray Train's FailureConfig)."""
    storage = Storage(storage_dir)
    metrics = join(storage.uri, f"learner-cycle-{job.cycle}.json")
    job = dataclasses.replace(job, metrics_path=metrics)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(storage_path=storage.uri,
                                       name=f"learner-cycle-{job.cycle}",
                                       failure_config=ray.train.FailureConfig(
                                           max_failures=max_failures)),
    )
    trainer.fit()
    return json.loads(Storage(job.metrics_path).get_bytes(""))
