"""The long-lived processes of a run, as plain classes; `cluster/driver.py` wraps them with Ray.

Each takes only its own config and the run's storage URI (`<run>`: a local path or s3://...).
Each logs to node-local scratch, shipped to `<run>/logs/<name>.log` after every cycle, and serves
Prometheus metrics on a free loopback port, announced as a file_sd target in
`<run>/metrics/targets/`. Durable artifacts go to `<run>` directly (replay/storage.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.loop import EnvironmentLoop, EpisodeContext, episode_identity
from actors.robot_spec import is_robot_task
from actors.wave_writer import WaveWriter, Written
from cluster.config import ClusterConfig, EnvConfig
from cluster.metrics import (ActorMetrics, FunctionCollector, LearnerMetrics, TimedIterator,
                             quarantine_collector, replay_collector)
from cluster.process import RunProcess, advertised_host, read_address
from cluster.robots import FleetCollector, FleetLedger
from learners.checkpoints import load_latest_good, save_checkpoint
from learners.config import LearnerConfig
from learners.learner import PACLearner
from policies.limits import GatewayLimits
from policies.perceiver import PerceiverConfig
from policies.policy import PACPolicy, Policy, RandomPolicy
from policies.client import PolicyClient, PolicySubscriber
from policies.security import unpack_client_security
from policies.server import PolicyServer
from policies.snapshot import Snapshot, load_snapshot, read_snapshot_metadata, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.ingest import EpisodeSink, Ingested
from replay.server import ReplayServer
from replay.spec import Adder, EnvSpec, Episode
from replay.storage import Storage, is_remote, join, run_id, scratch_dir


MODES = ("collect", "eval")  # episode modes; the index goes into each episode's seed


def actor_tasks(tasks: tuple[str, ...], index: int, num_actors: int) -> list[str]:
    """The tasks actor `index` runs: every num_actors-th task, or one task when there are fewer
    tasks than actors. actor_tasks(("a", "b", "c"), 0, 2) == ["a", "c"]."""
    if len(tasks) >= num_actors:
        return list(tasks[index::num_actors])
    return [tasks[index % len(tasks)]]


def sim_tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The entries of env.tasks that sim actors run (robot:<spec> entries are robots')."""
    return tuple(t for t in tasks if not is_robot_task(t))


def summarize(episode: Episode, accepted: bool) -> dict:
    lin = episode.lineage
    return {"episode_id": lin.episode_id, "task": lin.task, "return": episode.episode_return,
            "length": episode.length, "policy_version": lin.policy_version,
            "mode": lin.mode, "accepted": accepted}


class ReplayWorker(RunProcess):
    """The Reverb server of the run. With object-store run storage, Reverb checkpoints to this
    node's scratch and each checkpoint is uploaded to `<run>/replay_checkpoints/`."""

    def __init__(self, spec: EnvSpec, config: ReplayConfig, run: str,
                 cluster_config: ClusterConfig):
        super().__init__(run, "replay", advertised_host(cluster_config))
        if is_remote(run):
            local, stored = scratch_dir(run, "replay") / "replay_checkpoints", \
                join(run, "replay_checkpoints")
        else:  # a local or shared folder is durable itself
            local, stored = Path(Storage(run).root) / "replay_checkpoints", None
        self._server = ReplayServer(spec, config, local, advertised_host(cluster_config),
                                    port=self.stable_port(cluster_config.replay_port) or None,
                                    storage=stored, exit_on_partial=True)
        self.remember_address(self._server.address)
        self.registry.register(replay_collector(self._server.rate_stats,
                                                lambda: self._server.last_checkpoint))
        # Catch up with the archive (episodes archived after the restored checkpoint) while
        # serving; writes from actors go through the same ledger, so nothing is written twice.
        archive = EpisodeArchive(join(run, "archive"))
        threading.Thread(target=self._server.reconcile, args=(archive,), name="reconcile",
                         daemon=True).start()

    def address(self) -> str:
        return self._server.address

    def ingest(self, episode: Episode) -> int:
        """Writes a finished, archived episode into replay (a repeat writes nothing)."""
        return self._server.ingest(episode)

    def holds(self, episode_id: str) -> bool:
        return self._server.holds(episode_id)

    def num_items(self) -> int:
        return self._server.num_items()

    def checkpoint(self) -> str:
        return self._server.checkpoint()

    def rate_stats(self) -> dict[str, float]:
        return self._server.rate_stats()


class ReplayActorAdder(Adder):
    """Sends each finished episode to the run's replay process, which writes it there
    (`ReplayServer.ingest`): a collector killed mid-write leaves none of its items in replay, and
    repeats are no-ops. A replay process that restarts gets the call again (Ray's task retries).
    """

    idempotent = True

    def __init__(self, replay: "ray.actor.ActorHandle"):
        self._replay = replay

    def add_episode(self, episode: Episode, priorities: np.ndarray | None = None) -> int:
        if priorities is not None:
            raise ValueError("the run's replay process writes priority 1 for every item")
        return ray.get(self._replay.ingest.remote(episode))

    def holds(self, episode_id: str) -> bool:
        return ray.get(self._replay.holds.remote(episode_id))


class PolicyServerWorker(RunProcess):
    """The gRPC policy server of the run, storing versions under `<run>/policies/`. With the
    run's replay process and env spec it is also the run's robot gateway: uploads are
    validated against the spec, archived and sent to replay like the actors' episodes."""

    def __init__(self, run: str, cluster_config: ClusterConfig,
                 limits: GatewayLimits = GatewayLimits(),
                 replay: "ray.actor.ActorHandle | None" = None, spec: EnvSpec | None = None):
        super().__init__(run, "policyserver", advertised_host(cluster_config))
        handler = None
        self._ledger = FleetLedger(run)
        self.registry.register(FleetCollector(self._ledger))
        if replay is not None and spec is not None:
            sink = EpisodeSink(spec, EpisodeArchive(join(run, "archive")),
                               ReplayActorAdder(replay), join(run, "quarantine"))
            self.registry.register(quarantine_collector(sink))

            def handler(episode: Episode) -> Ingested:  # the gRPC server's upload threads
                result = sink.ingest(episode, to_replay=True)
                self._ledger.record(episode, result)
                return result
        self._server = PolicyServer(join(run, "policies"), host=advertised_host(cluster_config),
                                    port=self.stable_port(cluster_config.policy_port),
                                    security=cluster_config.policy_server_security(),
                                    limits=limits, episode_handler=handler,
                                    status_handler=self._ledger.report,
                                    registry=self.registry)
        self._address = self._server.start()
        self.remember_address(self._address)

    def address(self) -> str:
        return self._address

    def latest_version(self) -> int:
        return self._server.latest_version

    def fleet_progress(self, version: int) -> dict[str, dict]:
        """Per robot: accepted episodes acted by `version`, and totals (cluster/robots.py)."""
        return self._ledger.progress(version)


class CollectorWorker(RunProcess):
    """A sim actor: steps its environments with the newest pushed policy and writes episodes."""

    def __init__(self, index: int, spec: EnvSpec, env_config: EnvConfig,
                 cluster_config: ClusterConfig, model_config: PerceiverConfig,
                 replay: "ray.actor.ActorHandle", addresses: dict[str, str], run: str,
                 seed: int, name: str = "", credentials: dict[str, bytes] | None = None):
        torch.set_num_threads(1)
        os.nice(cluster_config.actor_nice)
        self.actor_id, self._seed = name or f"actor-{index}", seed
        super().__init__(run, self.actor_id, advertised_host(cluster_config))
        self._spec = spec
        # Tasks are dealt out round-robin; an actor with several steps them in turn, a wave each.
        tasks = actor_tasks(sim_tasks(env_config.tasks), index, cluster_config.num_actors)
        self._envs = {t: [env_config.make(t, seed + i)
                          for i in range(cluster_config.envs_per_actor)] for t in tasks}
        self._loops = {t: EnvironmentLoop(envs, spec) for t, envs in self._envs.items()}
        self._sink = EpisodeSink(spec, EpisodeArchive(join(run, "archive")),
                                 ReplayActorAdder(replay), join(run, "quarantine"))
        self.registry.register(quarantine_collector(self._sink))
        self._policy: Policy = RandomPolicy(spec, model_config.num_action_bins, seed)
        self._subscriber = PolicySubscriber(
            addresses["policy"], self.actor_id,
            unpack_client_security(credentials or {},
                                   scratch_dir(run, self.actor_id) / "credentials"),
            functools.partial(read_address, run, "policyserver"),
            local_read=True).start()  # on the server's host: its files, no copy
        self._writer = WaveWriter(lambda wave: self._write(*wave))  # (episodes, to_replay)
        self._metrics = ActorMetrics(self.registry, run, self.actor_id,
                                     lambda: self._policy.policy_version, self._newest_received)

    def _switch_policy(self) -> None:
        """Takes the newest pushed version; called only between waves (episode boundaries)."""
        snapshot = self._subscriber.latest()
        if snapshot is not None and snapshot.version > self._policy.policy_version:
            self._policy = PACPolicy.from_snapshot(snapshot, self._seed + snapshot.version)

    def _env_steps_so_far(self) -> int:
        return sum(e.num_env_steps for envs in self._envs.values() for e in envs)

    def _newest_version(self) -> int:
        newest = self._subscriber.latest()
        return newest.version if newest is not None else 0

    def _newest_received(self) -> tuple[int, float]:
        """(newest version received, when it was received)."""
        return self._newest_version(), self._subscriber.received_at

    def _run_waves(self, policy_fn, num_episodes: int, cycle: int, mode: str,
                   to_replay: bool) -> list[dict]:
        """Episodes in waves of envs_per_actor, one task per wave, tasks in turn; each wave is
        written (archive, and replay when `to_replay`) on the writer thread while the next
        wave acts (actors/wave_writer.py), and all are written when this returns. Returns
        summaries.

        The k-th episode of (cycle, mode) has a seed and an id that depend only on those, so a
        restarted actor redoing a call repeats its seeds and ids (the archive keeps each id
        once), and a resumed run continues the seed sequence instead of restarting it."""
        # A call that failed midway may have left a wave being written: it ends uncounted
        # (its retry redoes the same ids, which the archive keeps once).
        self._writer.discard()
        summaries: list[dict] = []
        tasks, wave, started = list(self._loops), 0, 0
        while started < num_episodes:
            task = tasks[(cycle + wave) % len(tasks)]
            wave += 1
            loop, k = self._loops[task], len(self._envs[task])
            ctx = EpisodeContext(run_id(self._run), cycle, self.actor_id, task,
                                 self._spec.task_names.index(task), mode)
            index = range(started, min(started + k, num_episodes))
            started += len(index)
            seeds = [int(np.random.SeedSequence([self._seed, cycle, MODES.index(mode), i])
                         .generate_state(1)[0]) for i in index]
            ids = [episode_identity(ctx.run_id, mode, cycle, self.actor_id, i) for i in index]
            steps, t0 = self._env_steps_so_far(), time.monotonic()
            episodes = loop.run(policy_fn(), seeds, ctx, greedy=(mode == "eval"),
                                episode_ids=ids, newest_version=self._newest_version)
            acted = (task, self._env_steps_so_far() - steps, time.monotonic() - t0)
            staleness = [loop.staleness.pop(e.lineage.episode_id, (0.0, 0)) for e in episodes]
            summaries += self._written(self._writer.submit(
                (list(zip(episodes, staleness)), to_replay), tag=acted))
        return summaries + self._written(self._writer.finish())

    def _written(self, waves: list[Written[list[dict]]]) -> list[dict]:
        """Summaries of written waves, after counting them in the metrics. A call Ray retries
        after a restart repeats its waves (same ids): those were counted before the kill, so a
        wave whose episodes were all archived already is not."""
        out: list[dict] = []
        for done in waves:
            task, steps, seconds = done.tag
            new = [(e["mode"], e["return"]) for e in done.result if e["stored"]]
            self._metrics.wave(task, steps if new else 0, seconds + done.waited, new)
            out += done.result
        return out

    def _write(self, wave: list[tuple[Episode, tuple[float, int]]], to_replay: bool
               ) -> list[dict]:
        """Archives (and replays) a wave's episodes, on the writer thread; each summary carries
        its staleness over its steps (mean and max): the newest version this actor had
        received at the step, minus the version that acted."""
        out = []
        for ep, (mean, most) in wave:
            result = self._sink.ingest(ep, to_replay=to_replay)
            out.append({**summarize(ep, not result.problems), "stored": result.stored,
                        "staleness": mean, "staleness_max": most})
        return out

    def collect(self, num_episodes: int, cycle: int, min_version: int,
                timeout_seconds: float) -> dict:
        """Collects episodes with the newest policy (at least `min_version`)."""
        t0 = time.monotonic()
        if min_version > 0:
            self._subscriber.wait_for_version(min_version, timeout_seconds)
        steps_before = self._env_steps_so_far()

        def newest_policy() -> Policy:  # called between waves only: episode boundaries
            self._switch_policy()
            return self._policy

        summaries = self._run_waves(newest_policy, num_episodes, cycle, "collect", True)
        env_steps = self._env_steps_so_far() - steps_before
        return {"episodes": summaries, "env_steps": env_steps,
                "quarantined": dict(self._sink.rejected), "seconds": time.monotonic() - t0}

    def evaluate(self, snapshot: Snapshot, num_episodes: int, cycle: int) -> dict:
        """Greedy episodes with a candidate snapshot; archived with mode "eval", not replayed."""
        t0 = time.monotonic()
        policy = PACPolicy.from_snapshot(snapshot, self._seed)
        return {"episodes": self._run_waves(lambda: policy, num_episodes, cycle, "eval", False),
                "version": snapshot.version, "seconds": time.monotonic() - t0}

    def evaluate_published(self, version: int, num_episodes: int,
                           timeout_seconds: float) -> dict:
        """Greedy episodes with the newest pushed version (at least `version`): the async
        loop's evaluator. Its episode ids use the version as their cycle."""
        snapshot = self._subscriber.wait_for_version(version, timeout_seconds)
        return self.evaluate(snapshot, num_episodes, snapshot.version)

    def close(self) -> None:
        self._subscriber.close()


def reverb_batches(address: str, config: ReplayConfig, batch_size: int, pin_memory: bool,
                   rank: int) -> ReverbBatchIterator:
    """A data-parallel worker's batches (every rank samples the one table independently)."""
    return ReverbBatchIterator(address, config, batch_size, pin_memory)


class LearnerWorker(RunProcess):
    """The PAC learner: trains on replay, makes snapshots, publishes, checkpoints.

    With `cluster.learner_workers > 1` each `train` call runs a Ray Train data-parallel job
    (cluster/ddp.py) whose rank 0 checkpoints; this process then loads that checkpoint into its
    own replica, from which it makes snapshots.
    """

    def __init__(self, spec: EnvSpec, model_config: PerceiverConfig, config: LearnerConfig,
                 replay_config: ReplayConfig, replay_address: str, run: str, seed: int,
                 cluster_config: ClusterConfig = ClusterConfig(),
                 credentials: dict[str, bytes] | None = None):
        super().__init__(run, "learner", advertised_host(cluster_config))
        # Only the learner's own credentials, written to this node's scratch.
        self._security = unpack_client_security(credentials or {},
                                                scratch_dir(run, "learner") / "credentials")
        self._cluster, self._seed = cluster_config, seed
        self._checkpoints = join(run, "checkpoints")
        self._replay = (replay_address, replay_config)
        self._metrics = LearnerMetrics(self.registry, run)
        # Data-parallel: the Ray Train workers sample; this replica only restores and snapshots.
        self._iterator = ReverbBatchIterator(replay_address, replay_config, config.batch_size,
                                             pin_memory=torch.cuda.is_available(),
                                             resolve=functools.partial(read_address, run,
                                                                       "replay")) \
            if cluster_config.learner_workers == 1 else None
        if self._iterator is not None:  # read at every scrape: a stall shows while it lasts
            iterator = self._iterator
            self.registry.register(FunctionCollector([(
                "pacflow_learner_replay_stalls", "counter", (),
                lambda: {(): iterator.num_stalls})]))
        batches = TimedIterator(self._iterator, self._metrics.waiting) \
            if self._iterator is not None else iter(())
        self._learner = PACLearner(spec, model_config, config, batches, seed)
        self._spec, self._model_config = spec, model_config
        state = load_latest_good(self._checkpoints)
        self._lineage = {"init_from": self._base(config.init_from, state is None)} \
            if config.init_from else {}  # recorded in every snapshot this run makes
        if state is not None:  # a resumed run continues the learner it had
            self._learner.restore(state)
            logging.getLogger(__name__).info("restored learner from %s", state["path"])
        elif config.init_from:  # checkpointed at once: data-parallel workers restore it too
            self._learner.load_weights(load_snapshot(config.init_from).state_dict())
            save_checkpoint(self._learner.state(), self._checkpoints, 0, -1)
        self._candidate: Snapshot | None = None
        self._last_metrics: dict = {}

    @staticmethod
    def _base(path: str, needed: bool) -> dict:
        """The lineage of learner.init_from; once the run has checkpoints the snapshot may be
        gone (a resumed or restarted learner does not read its weights again)."""
        try:
            meta = read_snapshot_metadata(path)
        except (OSError, KeyError, ValueError):
            if needed:
                raise
            return {"snapshot": path}
        return {"snapshot": path, "version": int(meta["version"]), "sha256": meta["sha256"]}

    def train(self, target_steps: int, cycle: int = 0, snapshot_version: int = 0) -> dict:
        """Trains until `target_steps` updates in all (fewer after `stop`), then checkpoints, and
        with `snapshot_version` makes that version's snapshot of the new weights for `publish`
        (the async loop publishes it while the next call trains). Safe to retry after a restart:
        the restarted learner restores its newest checkpoint and trains only what is missing, so
        snapshot and publish calls that follow see this cycle's weights."""
        t0 = time.monotonic()
        before = self._learner.num_steps
        num_steps = max(target_steps - before, 0)
        self._metrics.start(before)
        with self._metrics.training:
            if not num_steps:
                metrics = {}
            elif self._cluster.learner_workers > 1:  # rank 0 of the train job checkpointed
                metrics = self._train_data_parallel(num_steps, cycle)
                for step in range(before + 1, self._learner.num_steps + 1):  # call means
                    self._metrics.on_update(step, metrics)
            else:
                metrics = self._learner.run(num_steps, on_update=self._metrics.on_update)
                save_checkpoint(self._learner.state(), self._checkpoints,
                                step=self._learner.num_steps, cycle=cycle)
        self._metrics.finish(self._learner.num_steps)
        self._last_metrics = metrics = metrics or self._last_metrics
        done = self._learner.num_steps - before
        if snapshot_version and done:
            self.make_snapshot(snapshot_version, cycle)
        return {**metrics, "learner_steps": self._learner.num_steps,
                "snapshot": snapshot_version if done else 0, "seconds": time.monotonic() - t0,
                "data_wait_seconds": metrics.get("data_wait_s", 0.0) * done}

    def _train_data_parallel(self, num_steps: int, cycle: int) -> dict:
        from cluster.ddp import DataParallelJob, train_data_parallel

        n, use_gpu = self._cluster.learner_workers, self._cluster.learner_gpus > 0
        config = dataclasses.replace(self._learner.config,
                                     batch_size=max(self._learner.config.batch_size // n, 1))
        address, replay_config = self._replay
        job = DataParallelJob(self._spec, self._model_config, config,
                              functools.partial(reverb_batches, address, replay_config,
                                                config.batch_size, use_gpu),
                              num_steps, self._checkpoints, self._seed, cycle)
        metrics = train_data_parallel(job, n, use_gpu, join(self._run, "learner_train"),
                                      self._cluster.learner_cpus, self._cluster.max_restarts)
        self._learner.restore(load_latest_good(self._checkpoints))
        return metrics

    def num_steps(self) -> int:
        return self._learner.num_steps

    def stop(self) -> None:
        """Ends the current train call (and makes later ones return at once) after the update in
        progress: the async loop's end, called from a second thread of this actor while `train`
        waits for data that will not come."""
        if self._iterator is not None:
            self._iterator.interrupt()

    def make_snapshot(self, version: int, cycle: int) -> Snapshot:
        metadata = snapshot_metadata(self._spec.to_dict(), self._model_config, cycle,
                                     self._learner.num_steps, version - 1, **self._lineage)
        self._candidate = Snapshot.from_state_dict(version, self._learner.get_variables(),
                                                   metadata)
        return self._candidate

    def publish(self, policy_address: str, version: int, cycle: int) -> int:
        """Publishes `version` (the candidate, or made again after a restart); a version the
        server already holds (published before a restart) is not sent twice."""
        with PolicyClient(policy_address, security=self._security,
                          wait_for_ready=True) as client:
            if any(v.version >= version for v in client.list().versions):
                return version
            if self._candidate is None or self._candidate.version != version:
                self.make_snapshot(version, cycle)
            return client.publish(self._candidate)
