"""The run's policy server is also its robot gateway: an authenticated upload goes through the
run's validation, archive and replay path (the replay process writes it), on a local Ray
instance with the same Ray actors a run starts."""

import dataclasses
import os
import signal

import grpc
import numpy as np
import pytest
import ray

from cluster.config import load_config
from cluster.workers import GATEWAY_REPLAY_SECONDS, PolicyServerWorker, ReplayWorker
from policies.client import PolicyClient
from replay.archive import EpisodeArchive
from tests.fakes import make_episode
from tests.processes import until

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

        # A frozen replay process (SIGSTOP: Ray does not restart it): the upload is archived,
        # the robot is told to retry after GATEWAY_REPLAY_SECONDS, and the episode reaches
        # replay once it runs again; the retry is a duplicate.
        late = make_episode(length=12, spec=spec, seed=2)
        late = dataclasses.replace(late, lineage=dataclasses.replace(late.lineage,
                                                                     actor_id="robot-7"))
        pid = ray.get(replay.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGSTOP)
        try:
            with PolicyClient(address, timeout=60) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.upload_episode(late)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert f"replay did not answer within {GATEWAY_REPLAY_SECONDS:g} s" in err.value.details()
        until(lambda: ray.get(replay.holds.remote(late.lineage.episode_id), timeout=60),
              "the queued episode in replay", timeout=60)
        with PolicyClient(address, timeout=60) as client:
            assert client.upload_episode(late).duplicate
        stats = ray.get(replay.rate_stats.remote(), timeout=60)
        assert (stats["items"], stats["episodes"]) == (2 * episode.length, 2)
    finally:
        ray.shutdown()
