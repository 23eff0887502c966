"""The sim actor of a run: steps its environments with the newest pushed policy and writes
episodes; `cluster/driver.py` wraps it with Ray like the processes in `cluster/workers.py`."""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import NoReturn

import numpy as np
import ray
import torch

from actors.env_group import EnvGroup, EnvProcesses, EnvProcessError, LocalEnvs
from actors.loop import EnvironmentLoop, EpisodeContext, episode_identity
from actors.robot_spec import is_robot_task
from actors.wave_writer import WaveWriter, Written
from cluster.config import ClusterConfig, EnvConfig
from cluster.metrics import ActorMetrics, quarantine_collector
from cluster.process import RunProcess, advertised_host, node_id, read_address
from cluster.workers import ReplayActorAdder, relay_name
from policies.client import PLAINTEXT, PolicySubscriber
from policies.perceiver import PerceiverConfig
from policies.policy import PACPolicy, Policy, RandomPolicy
from policies.security import unpack_client_security
from policies.snapshot import Snapshot
from replay.archive import EpisodeArchive
from replay.ingest import EpisodeSink
from replay.spec import EnvSpec, Episode
from replay.storage import join, run_id, scratch_dir

log = logging.getLogger(__name__)

EXIT_FOR_RESTART = 75  # the exit code of a collector whose env process died (EX_TEMPFAIL)
MODES = ("collect", "eval")  # episode modes; the index goes into each episode's seed


def _exit_for_restart(actor_id: str, error: EnvProcessError) -> NoReturn:
    """Ends this process as a crash, so Ray restarts the collector (cluster.max_restarts) and
    repeats the call in progress: a lost env process is an actor's death, not a wrong
    argument (the exception would end the run instead)."""
    log.error("%s: %s; exiting so that Ray restarts this collector", actor_id, error)
    logging.shutdown()
    os._exit(EXIT_FOR_RESTART)


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
        seeds, processes = [seed + i for i in range(cluster_config.envs_per_actor)], \
            cluster_config.env_processes
        if processes:  # its tasks share the children
            children = EnvProcesses(env_config.make, tasks, seeds, processes)
            self._envs: dict[str, EnvGroup] = {t: children.group(t) for t in tasks}
        else:
            self._envs = {t: LocalEnvs([env_config.make(t, s) for s in seeds]) for t in tasks}
        self._loops = {t: EnvironmentLoop(envs, spec) for t, envs in self._envs.items()}
        self._sink = EpisodeSink(spec, EpisodeArchive(join(run, "archive")),
                                 ReplayActorAdder(replay), join(run, "quarantine"))
        self.registry.register(quarantine_collector(self._sink))
        self._policy: Policy = RandomPolicy(spec, model_config.num_action_bins, seed)
        self._addresses, self._credentials = addresses, credentials or {}
        self._relays = cluster_config.policy_relays
        self._source, self._subscriber = self._subscribe()
        self._writer = WaveWriter(lambda wave: self._write(*wave))  # (episodes, to_replay)
        self._metrics = ActorMetrics(self.registry, run, self.actor_id,
                                     lambda: self._policy.policy_version, self._newest_received)

    def _relay_address(self) -> str | None:
        """This node's policy relay (another node than the policy server's): in the addresses
        the driver gave, else (relays on) as announced in run storage by one started after
        them (a node that joined later, which Ray may restart this collector onto)."""
        relay = relay_name(node_id())
        if relay in self._addresses or not self._relays:
            return self._addresses.get(relay)
        found = read_address(self._run, relay)
        return found[0] if found else None

    def _subscribe(self) -> tuple[str, PolicySubscriber]:
        """(source, subscriber): the relay's files when this node has one, else the policy
        server's (its files on its host, data parts elsewhere)."""
        relay = self._relay_address()
        if relay is not None:  # on loopback, plaintext
            source, address, security = relay_name(node_id()), relay, PLAINTEXT
        else:
            source, address = "policyserver", self._addresses["policy"]
            security = unpack_client_security(self._credentials,
                                              scratch_dir(self._run, self.actor_id) / "credentials")
        return source, PolicySubscriber(address, self.actor_id, security, functools.partial(
            read_address, self._run, source), local_read=True).start()

    def _to_relay(self) -> None:
        """Subscribes through this node's relay if one has started since (best effort: run
        storage that cannot be read now leaves the subscription as it is)."""
        try:
            if self._source != "policyserver" or self._relay_address() is None:
                return
            source, subscriber = self._subscribe()
        except Exception as e:
            log.warning("%s: looking for this node's policy relay: %s", self.actor_id, e)
            return
        log.info("%s: this node's policy relay has started; receiving versions from it",
                 self.actor_id)
        previous, (self._source, self._subscriber) = self._subscriber, (source, subscriber)
        previous.close()

    def _switch_policy(self) -> None:
        """Takes the newest pushed version; called only between waves (episode boundaries)."""
        snapshot = self._subscriber.latest()
        if snapshot is not None and snapshot.version > self._policy.policy_version:
            self._policy = PACPolicy.from_snapshot(snapshot, self._seed + snapshot.version)

    def _env_steps_so_far(self) -> int:
        return sum(envs.num_env_steps for envs in self._envs.values())

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
            try:
                episodes = loop.run(policy_fn(), seeds, ctx, greedy=(mode == "eval"),
                                    episode_ids=ids, newest_version=self._newest_version)
            except EnvProcessError as e:
                _exit_for_restart(self.actor_id, e)
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
        self._to_relay()
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
        self._writer.close()
        self._subscriber.close()
        for envs in self._envs.values():
            envs.close()
