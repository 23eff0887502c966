"""The run's policy server is also its robot gateway: an authenticated upload goes through the
run's validation, archive and replay path (the replay process writes it), on a local Ray
instance with the same Ray actors a run starts."""

import dataclasses

import numpy as np
import pytest
import ray

from cluster.config import load_config
from cluster.workers import PolicyServerWorker, ReplayWorker
from policies.client import PolicyClient
from replay.archive import EpisodeArchive
from tests.fakes import make_episode

pytestmark = pytest.mark.slow


def test_robot_uploads_to_a_run_reach_its_archive_and_replay_once(tmp_path):
    config = load_config("deploy/configs/smoke.yaml")
    spec, cluster, run = config.env.spec(), config.cluster, str(tmp_path / "run")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        replay = ray.remote(num_cpus=0, max_concurrency=4)(ReplayWorker).remote(
            spec, config.replay, run, cluster)
        policy = ray.remote(num_cpus=0)(PolicyServerWorker).remote(
            run, cluster, config.gateway, replay, spec)
        address = ray.get(policy.address.remote(), timeout=120)
        episode = make_episode(length=12, spec=spec)
        episode = dataclasses.replace(episode, lineage=dataclasses.replace(
            episode.lineage, actor_id="robot-7"))
        bad = make_episode(length=12, spec=spec, seed=1)
        bad = dataclasses.replace(bad, lineage=dataclasses.replace(bad.lineage,
                                                                   actor_id="robot-7"))
        bad.reward[3] = np.nan
        with PolicyClient(address, timeout=60) as client:
            first, again = client.upload_episode(episode), client.upload_episode(episode)
            refused = client.upload_episode(bad)
        assert (first.stored, again.duplicate) == (True, True)
        assert "reward: non-finite" in refused.quarantined
        stats = ray.get(replay.rate_stats.remote(), timeout=60)
        assert (stats["items"], stats["episodes"]) == (episode.length, 1)
        assert ray.get(replay.holds.remote(episode.lineage.episode_id), timeout=60)
        (stored,) = EpisodeArchive(tmp_path / "run" / "archive").episodes()
        assert stored.lineage.actor_id == "robot-7"
        assert (tmp_path / "run" / "quarantine" / f"{bad.lineage.episode_id}.reason.json").exists()
    finally:
        ray.shutdown()
