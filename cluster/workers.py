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
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from cluster.config import ClusterConfig
from cluster.metrics import (FunctionCollector, LearnerMetrics, TimedIterator,
                             quarantine_collector, replay_collector)
from cluster.process import RunProcess, advertised_host, node_id, read_address
from cluster.robots import FleetCollector, FleetLedger
from learners.checkpoints import load_latest_good, save_checkpoint
from learners.config import LearnerConfig
from learners.learner import PACLearner
from policies.limits import GatewayLimits
from policies.perceiver import PerceiverConfig
from policies.client import PolicyClient
from policies.security import unpack_client_security
from policies.relay import PolicyRelay
from policies.server import PolicyServer
from policies.snapshot import Snapshot, load_snapshot, read_snapshot_metadata, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.ingest import EpisodeSink, Ingested
from replay.server import ReplayServer
from replay.spec import Adder, EnvSpec, Episode
from replay.storage import Storage, is_remote, join, scratch_dir

# A robot upload waits this long for replay to take its episode (archived by then); after it the
# robot is told to retry, and the episode stays queued for replay (policies/server.py).
GATEWAY_REPLAY_SECONDS = 20.0


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

    def __init__(self, replay: "ray.actor.ActorHandle", timeout: float | None = None):
        # timeout: a call replay has not answered in this many seconds raises TimeoutError; the
        # call stays queued there (and is repeated on its restart). None: wait (a collector's
        # calls are bounded by the driver's call timeout)
        self._replay, self._timeout = replay, timeout

    def _get(self, ref: "ray.ObjectRef"):
        try:
            return ray.get(ref, timeout=self._timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"replay did not answer within {self._timeout:g} s; the episode "
                               "is archived and stays queued for replay") from None

    def add_episode(self, episode: Episode, priorities: np.ndarray | None = None) -> int:
        if priorities is not None:
            raise ValueError("the run's replay process writes priority 1 for every item")
        return self._get(self._replay.ingest.remote(episode))

    def holds(self, episode_id: str) -> bool:
        return self._get(self._replay.holds.remote(episode_id))


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
                               ReplayActorAdder(replay, timeout=GATEWAY_REPLAY_SECONDS),
                               join(run, "quarantine"))
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


def relay_name(node: str) -> str:
    """The process name of the policy relay on Ray node `node` (a hex node id)."""
    return f"relay-{node[:12]}"


class PolicyRelayWorker(RunProcess):
    """A policy relay (policies/relay.py) on one node other than the policy server's: it takes
    each version from the run's policy server once, and the collectors on its node read its
    files (cluster.policy_relays). Its server binds the node's loopback only: its clients are
    on its node. A restarted one keeps its port and its versions (node scratch)."""

    def __init__(self, run: str, cluster_config: ClusterConfig, upstream: str,
                 credentials: dict[str, bytes] | None = None):
        name = relay_name(node_id())
        super().__init__(run, name, advertised_host(cluster_config))
        scratch = scratch_dir(run, name)
        self._relay = PolicyRelay(
            upstream, scratch / "policies", host="127.0.0.1", port=self.stable_port(0),
            client_id=name, upstream_security=unpack_client_security(credentials or {},
                                                                     scratch / "credentials"),
            resolve=functools.partial(read_address, run, "policyserver"),
            registry=self.registry).start()
        self.remember_address(self._relay.address)

    def address(self) -> str:
        return self._relay.address


def reverb_batches(address: str, config: ReplayConfig, batch_size: int, pin_memory: bool,
                   run: str, rank: int) -> ReverbBatchIterator:
    """A data-parallel worker's batches (every rank samples the one table independently); like
    the single learner's, they find a restarted replay server through `<run>/addresses/`."""
    return ReverbBatchIterator(address, config, batch_size, pin_memory,
                               resolve=functools.partial(read_address, run, "replay"))


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
                                                config.batch_size, use_gpu, self._run),
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
