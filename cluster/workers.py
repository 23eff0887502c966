"""The long-lived processes of a run, as plain classes; `cluster/driver.py` wraps them with Ray.

Each takes only its own config. Each logs to `<run_dir>/logs/<name>.log` and serves Prometheus
metrics on a free loopback port, announced as a file_sd target in `<run_dir>/metrics/targets/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from actors.loop import EnvironmentLoop, EpisodeContext
from cluster.config import ClusterConfig, EnvConfig
from learners.checkpoints import load_latest_good, save_checkpoint
from learners.config import LearnerConfig
from learners.learner import PACLearner
from policies.perceiver import PerceiverConfig
from policies.policy import PACPolicy, Policy, RandomPolicy
from policies.client import PolicySubscriber, publish
from policies.server import PolicyServer
from policies.snapshot import Snapshot, snapshot_metadata
from replay.adders import ReverbSequenceAdder
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.ingest import EpisodeSink
from replay.server import ReplayServer
from replay.spec import EnvSpec, Episode


def setup_process(run_dir: Path, name: str) -> CollectorRegistry:
    """Logging to the run's logs folder and a metrics endpoint announced for Prometheus."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    registry = CollectorRegistry()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    targets = run_dir / "metrics" / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    entry = [{"targets": [f"127.0.0.1:{server.server_port}"],
              "labels": {"component": name.split("-")[0], "instance_name": name,
                         "run_id": run_dir.name}}]
    tmp = targets / f".{name}.json.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, targets / f"{name}.json")
    return registry


def actor_tasks(tasks: tuple[str, ...], index: int, num_actors: int) -> list[str]:
    """The tasks actor `index` runs: every num_actors-th task, or one task when there are fewer
    tasks than actors. actor_tasks(("a", "b", "c"), 0, 2) == ["a", "c"]."""
    if len(tasks) >= num_actors:
        return list(tasks[index::num_actors])
    return [tasks[index % len(tasks)]]


def summarize(episode: Episode, accepted: bool) -> dict:
    lin = episode.lineage
    return {"episode_id": lin.episode_id, "task": lin.task, "return": episode.episode_return,
            "length": episode.length, "policy_version": lin.policy_version,
            "mode": lin.mode, "accepted": accepted}


class ReplayWorker:
    """The Reverb server of the run."""

    def __init__(self, spec: EnvSpec, config: ReplayConfig, run_dir: str, host: str):
        setup_process(Path(run_dir), "replay")
        self._server = ReplayServer(spec, config, Path(run_dir) / "replay_checkpoints", host)

    def address(self) -> str:
        return self._server.address

    def num_items(self) -> int:
        return self._server.num_items()

    def checkpoint(self) -> str:
        return self._server.checkpoint()


class PolicyServerWorker:
    """The gRPC policy server of the run, storing versions under `<run_dir>/policies/`."""

    def __init__(self, run_dir: str, cluster_config: ClusterConfig):
        setup_process(Path(run_dir), "policyserver")
        self._server = PolicyServer(Path(run_dir) / "policies", host=cluster_config.host, port=0,
                                    security=cluster_config.policy_server_security())
        self._address = self._server.start()

    def address(self) -> str:
        return self._address

    def latest_version(self) -> int:
        return self._server.latest_version


class CollectorWorker:
    """A sim actor: steps its environments with the newest pushed policy and writes episodes."""

    def __init__(self, index: int, spec: EnvSpec, env_config: EnvConfig,
                 cluster_config: ClusterConfig, model_config: PerceiverConfig,
                 replay_config: ReplayConfig, addresses: dict[str, str], run_dir: str,
                 seed: int):
        torch.set_num_threads(1)
        self.actor_id, self._run_dir, self._seed = f"actor-{index}", Path(run_dir), seed
        registry = setup_process(self._run_dir, self.actor_id)
        self._episodes = Counter("pacflow_actor_episodes", "Episodes finished", ["mode"],
                                 registry=registry)
        self._env_steps = Counter("pacflow_actor_env_steps", "Environment steps",
                                  registry=registry)
        self._version = Gauge("pacflow_actor_policy_version", "Policy version acting",
                              registry=registry)
        self._spec = spec
        # Tasks are dealt out round-robin; an actor with several steps them in turn, a wave each.
        tasks = actor_tasks(env_config.tasks, index, cluster_config.num_actors)
        self._envs = {t: [env_config.make(t, seed + i)
                          for i in range(cluster_config.envs_per_actor)] for t in tasks}
        self._loops = {t: EnvironmentLoop(envs, spec) for t, envs in self._envs.items()}
        self._num_waves = 0
        self._sink = EpisodeSink(spec, EpisodeArchive(self._run_dir / "archive"),
                                 ReverbSequenceAdder(addresses["replay"], replay_config),
                                 self._run_dir / "quarantine")
        self._policy: Policy = RandomPolicy(spec, model_config.num_action_bins, seed)
        self._subscriber = PolicySubscriber(
            addresses["policy"], self.actor_id,
            cluster_config.policy_client_security("actor")).start()
        self._num_episodes = 0

    def _switch_policy(self) -> None:
        """Takes the newest pushed version; called only between waves (episode boundaries)."""
        snapshot = self._subscriber.latest()
        if snapshot is not None and snapshot.version > self._policy.policy_version:
            self._policy = PACPolicy.from_snapshot(snapshot, self._seed + snapshot.version)
            self._version.set(snapshot.version)

    def _seeds(self, n: int) -> list[int]:
        seeds = [int(s) for s in np.random.SeedSequence(
            [self._seed, self._num_episodes]).generate_state(n)]
        self._num_episodes += n
        return seeds

    def _env_steps_so_far(self) -> int:
        return sum(e.num_env_steps for envs in self._envs.values() for e in envs)

    def _run_waves(self, policy_fn, num_episodes: int, cycle: int, mode: str) -> list[Episode]:
        """Episodes in waves of envs_per_actor, one task per wave, tasks in turn."""
        episodes: list[Episode] = []
        while len(episodes) < num_episodes:
            task = list(self._loops)[self._num_waves % len(self._loops)]
            self._num_waves += 1
            loop, k = self._loops[task], len(self._envs[task])
            ctx = EpisodeContext(self._run_dir.name, cycle, self.actor_id, task,
                                 self._spec.task_names.index(task), mode)
            seeds = self._seeds(min(k, num_episodes - len(episodes)))
            episodes += loop.run(policy_fn(), seeds, ctx, greedy=(mode == "eval"))
        return episodes

    def _write(self, episodes: list[Episode], to_replay: bool) -> list[dict]:
        out = []
        for ep in episodes:
            out.append(summarize(ep, self._sink.write(ep, to_replay=to_replay)))
            self._episodes.labels(ep.lineage.mode).inc()
        return out

    def collect(self, num_episodes: int, cycle: int, min_version: int,
                timeout_seconds: float) -> dict:
        """Collects episodes with the newest policy (at least `min_version`)."""
        if min_version > 0:
            self._subscriber.wait_for_version(min_version, timeout_seconds)
        steps_before = self._env_steps_so_far()

        def newest_policy() -> Policy:  # called between waves only: episode boundaries
            self._switch_policy()
            return self._policy

        episodes = self._run_waves(newest_policy, num_episodes, cycle, "collect")
        summaries = self._write(episodes, to_replay=True)
        env_steps = self._env_steps_so_far() - steps_before
        self._env_steps.inc(env_steps)
        return {"episodes": summaries, "env_steps": env_steps,
                "quarantined": dict(self._sink.rejected)}

    def evaluate(self, snapshot: Snapshot, num_episodes: int, cycle: int) -> dict:
        """Greedy episodes with a candidate snapshot; archived with mode "eval", not replayed."""
        policy = PACPolicy.from_snapshot(snapshot, self._seed)
        episodes = self._run_waves(lambda: policy, num_episodes, cycle, "eval")
        return {"episodes": self._write(episodes, to_replay=False)}

    def close(self) -> None:
        self._subscriber.close()


def reverb_batches(address: str, config: ReplayConfig, batch_size: int, pin_memory: bool,
                   rank: int) -> ReverbBatchIterator:
    """A data-parallel worker's batches (every rank samples the one table independently)."""
    return ReverbBatchIterator(address, config, batch_size, pin_memory)


class LearnerWorker:
    """The PAC learner: trains on replay, makes snapshots, publishes, checkpoints.

    With `cluster.learner_workers > 1` each `train` call runs a Ray Train data-parallel job
    (cluster/ddp.py) whose rank 0 checkpoints; this process then loads that checkpoint into its
    own replica, from which it makes snapshots.
    """

    def __init__(self, spec: EnvSpec, model_config: PerceiverConfig, config: LearnerConfig,
                 replay_config: ReplayConfig, replay_address: str, run_dir: str, seed: int,
                 cluster_config: ClusterConfig = ClusterConfig()):
        self._run_dir, self._cluster, self._seed = Path(run_dir), cluster_config, seed
        self._replay = (replay_address, replay_config)
        registry = setup_process(self._run_dir, "learner")
        self._steps = Counter("pacflow_learner_steps", "Learner updates", registry=registry)
        self._loss = Gauge("pacflow_learner_loss", "Mean loss of the last train call",
                           ["term"], registry=registry)
        self._stalls = Gauge("pacflow_learner_replay_stalls", "Replay stalls reported so far",
                             registry=registry)
        # Data-parallel: the Ray Train workers sample; this replica only restores and snapshots.
        self._iterator = ReverbBatchIterator(replay_address, replay_config, config.batch_size,
                                             pin_memory=torch.cuda.is_available()) \
            if cluster_config.learner_workers == 1 else None
        self._learner = PACLearner(spec, model_config, config, self._iterator or iter(()), seed)
        self._spec, self._model_config = spec, model_config
        state = load_latest_good(self._run_dir / "checkpoints")
        if state is not None:  # a resumed run continues the learner it had
            self._learner.restore(state)
            logging.getLogger(__name__).info("restored learner from %s", state["path"])
        self._candidate: Snapshot | None = None

    def train(self, num_steps: int, cycle: int = 0) -> dict:
        if self._cluster.learner_workers > 1:
            metrics = self._train_data_parallel(num_steps, cycle)
        else:
            metrics = self._learner.run(num_steps)
        self._steps.inc(num_steps)
        for term in ("loss", "l_imp", "l_bc", "l_q"):
            self._loss.labels(term).set(metrics[term])
        if self._iterator is not None:
            self._stalls.set(self._iterator.num_stalls)
        return {**metrics, "learner_steps": self._learner.num_steps}

    def _train_data_parallel(self, num_steps: int, cycle: int) -> dict:
        from cluster.ddp import DataParallelJob, train_data_parallel

        n, use_gpu = self._cluster.learner_workers, self._cluster.learner_gpus > 0
        config = dataclasses.replace(self._learner.config,
                                     batch_size=max(self._learner.config.batch_size // n, 1))
        address, replay_config = self._replay
        job = DataParallelJob(self._spec, self._model_config, config,
                              functools.partial(reverb_batches, address, replay_config,
                                                config.batch_size, use_gpu),
                              num_steps, str(self._run_dir / "checkpoints"), self._seed, cycle)
        metrics = train_data_parallel(job, n, use_gpu, self._run_dir / "learner_train",
                                      self._cluster.learner_cpus)
        self._learner.restore(load_latest_good(self._run_dir / "checkpoints"))
        return metrics

    def num_steps(self) -> int:
        return self._learner.num_steps

    def make_snapshot(self, version: int, cycle: int) -> Snapshot:
        metadata = snapshot_metadata(self._spec.to_dict(), self._model_config, cycle,
                                     self._learner.num_steps, version - 1)
        self._candidate = Snapshot.from_state_dict(version, self._learner.get_variables(),
                                                   metadata)
        return self._candidate

    def publish(self, policy_address: str) -> int:
        assert self._candidate is not None, "make_snapshot before publish"
        return publish(policy_address, self._candidate,
                       security=self._cluster.policy_client_security("learner"))

    def checkpoint(self, cycle: int) -> str:
        if self._cluster.learner_workers > 1:  # rank 0 of the train job wrote it
            return str(load_latest_good(self._run_dir / "checkpoints")["path"])
        return str(save_checkpoint(self._learner.state(), self._run_dir / "checkpoints",
                                   step=self._learner.num_steps, cycle=cycle))
