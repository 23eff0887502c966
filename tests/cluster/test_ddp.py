"""Two Ray Train workers (gloo, CPU) train PAC data-parallel and stay identical."""

import dataclasses
import functools

import pytest
import ray

from cluster.ddp import DataParallelJob, train_data_parallel
from learners.checkpoints import load_checkpoint
from learners.config import LearnerConfig
from tests.fakes import SPEC, TINY_MODEL, random_batches

pytestmark = pytest.mark.slow


def _batches(rank: int):
    return random_batches(8, seed=100 + rank)  # each replica sees different data


def test_replicas_stay_identical_and_rank0_checkpoints(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = LearnerConfig(batch_size=8, device="cpu", num_threads=1)
        job = DataParallelJob(SPEC, TINY_MODEL, config, functools.partial(_batches),
                              num_steps=4, checkpoint_dir=str(tmp_path / "ckpt"), seed=3)
        first = train_data_parallel(job, num_workers=2, use_gpu=False,
                                    storage_dir=tmp_path / "train", cpus_per_worker=1)
        second = train_data_parallel(dataclasses.replace(job, cycle=1), num_workers=2,
                                     use_gpu=False, storage_dir=tmp_path / "train",
                                     cpus_per_worker=1)
    finally:
        ray.shutdown()
    a, b = first["replica_checksums"]
    assert a == b  # averaged gradients: bit-identical replicas despite different batches
    assert second["replica_checksums"][0] == second["replica_checksums"][1] != a
    assert (first["learner_steps"], second["learner_steps"]) == (4, 8)  # resumed from rank 0's
    ckpts = sorted((tmp_path / "ckpt").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000000004", "step_000000008"]
    assert load_checkpoint(ckpts[-1])["num_steps"] == 8

