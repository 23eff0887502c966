"""The run's Ray actors (`Topology`) and how the driver calls them: every call with a
timeout, a dead or hung process one `RunFailed` line naming it."""

from __future__ import annotations

import dataclasses
import json
import logging

import ray

from cluster.collector import CollectorWorker
from cluster.config import ExperimentConfig, LoopMode
from cluster.relays import NodeRelays
from cluster.workers import LearnerWorker, PolicyServerWorker, ReplayWorker
from replay.storage import Storage

log = logging.getLogger(__name__)


def split(total: int, parts: int) -> list[int]:
    """Splits `total` as evenly as possible: split(5, 2) == [3, 2]."""
    return [total // parts + (i < total % parts) for i in range(parts)]


SLIVER = 0.001  # of a custom resource: enough to pin an actor to the nodes that carry it


def placement(resource: str, driver_node: bool = False) -> dict:
    """Ray actor options pinning to the nodes with `resource`; else to the driver's node when
    asked; else anywhere."""
    if resource:
        return {"resources": {resource: SLIVER}}
    if driver_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)}
    return {}


class RunFailed(RuntimeError):
    """A process of the run died past its restarts, or hung; the message names it."""


def wait(calls: list[tuple[str, "ray.ObjectRef"]], what: str, timeout: float) -> list:
    """ray.get on (process name, ref) pairs with a timeout; a dead or hung process becomes one
    RunFailed line naming it."""
    try:
        return ray.get([ref for _, ref in calls], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ready, _ = ray.wait([ref for _, ref in calls], num_returns=len(calls), timeout=0)
        hung = [name for name, ref in calls if ref not in ready]
        raise RunFailed(f"{', '.join(hung)}: {what} did not finish within {timeout:.0f} s "
                        "(loop.call_timeout_seconds)") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        ready, _ = ray.wait([ref for _, ref in calls], num_returns=len(calls), timeout=0)
        names = [name for name, ref in calls if ref in ready and _failed(ref)] or \
            [n for n, _ in calls]
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFailed(f"{', '.join(names)}: died during {what} and could not be restarted "
                        f"(cluster.max_restarts): {cause}") from None


def restart_counts(run: str) -> dict[str, int]:
    """{process name: restarts} of the processes Ray has restarted in this run."""
    store = Storage(run)
    return {name.removesuffix(".json"): json.loads(store.get_bytes(f"restarts/{name}"))["restarts"]
            for name in store.list_files("restarts")}


def _failed(ref) -> bool:
    """Whether a finished call raised."""
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True


class Topology:
    """The run's Ray actors: one replay server, one policy server, one learner, N collectors.

    Every process restarts (cluster.max_restarts) and Ray retries the call it died in: the
    calls are safe to repeat (episode ids and seeds fixed per cycle, training up to a target
    step count from the newest checkpoint, publishing a version the server holds is a no-op).
    A restarted replay or policy server restores from run storage and announces its address
    (`<run>/addresses/`), where its clients find it (replay/reconnect.py)."""

    def __init__(self, config: ExperimentConfig, run: str,
                 credentials: dict[str, dict[str, bytes]]):
        """`credentials`: {"learner": ..., "actor": ...} from `run_credentials`."""
        c, self.run = config.cluster, run
        spec = config.env.spec()
        servers = placement(c.server_resource, driver_node=True)
        # A call is repeated until it succeeds or its process is out of restarts: while a lost
        # node is not yet declared dead, each retry fails at once as "temporarily unavailable",
        # and a bounded count ran out before Ray restarted the collectors elsewhere.
        restarts = {"max_restarts": c.max_restarts, "max_task_retries": -1}
        # Threaded: every collector's ingest, the driver's checkpoint and stats at once.
        self.replay = ray.remote(num_cpus=0, max_concurrency=c.num_actors + 4, **servers,
                                 **restarts)(ReplayWorker).remote(spec, config.replay, run, c)
        self.policy = ray.remote(num_cpus=0, **servers, **restarts)(PolicyServerWorker).remote(
            run, c, config.gateway, self.replay, spec)
        self.addresses = dict(zip(("replay", "policy"), wait(
            [("replay", self.replay.address.remote()), ("policyserver",
                                                         self.policy.address.remote())],
            "start-up", config.loop.call_timeout_seconds)))
        local = c.learner_workers == 1  # else the Ray Train workers hold the devices
        # Async: a second thread takes `stop` while `train` waits for data (cluster/async_loop.py).
        threads = 2 if config.loop.mode is LoopMode.ASYNC else 1
        self.learner = ray.remote(num_cpus=c.learner_cpus if local else 0,
                                  num_gpus=c.learner_gpus if local else 0,
                                  max_concurrency=threads,
                                  **placement(c.learner_resource), **restarts)(
            LearnerWorker).remote(spec, config.model, config.learner, config.replay,
                                  self.addresses["replay"], run, config.loop.seed, c,
                                  credentials["learner"])
        # Before the collectors, which find their node's relay among the addresses.
        server_node = wait([("policyserver", self.policy.node.remote())], "start-up",
                           config.loop.call_timeout_seconds)[0] if NodeRelays.wanted(c) else ""
        self.relays = NodeRelays(c, run, server_node, self.addresses["policy"],
                                 credentials["actor"], restarts)
        self.refresh_relays(config.loop.call_timeout_seconds, required=True)
        collector = ray.remote(num_cpus=c.actor_cpus, **placement(c.actor_resource),
                               **restarts)(CollectorWorker)
        self.actors = [
            collector.remote(i, spec, config.env, c, config.model, self.replay,
                             self.addresses, run, config.loop.seed * 1000 + i * 100,
                             credentials=credentials["actor"])
            for i in range(c.num_actors)]
        # Async: evaluation has an actor of its own (every task, its own seeds).
        self.evaluator = ray.remote(num_cpus=c.evaluator_cpus, **placement(c.actor_resource),
                                    **restarts)(CollectorWorker).remote(
            0, spec, config.env, dataclasses.replace(c, num_actors=1), config.model,
            self.replay, self.addresses, run, config.loop.seed * 1000 + 99, "evaluator",
            credentials["actor"]) \
            if config.loop.mode is LoopMode.ASYNC else None

    def policy_address(self, timeout: float) -> str:
        """The policy server's address now (a restarted server may have moved)."""
        (self.addresses["policy"],) = wait([("policyserver", self.policy.address.remote())],
                                           "address", timeout)
        return self.addresses["policy"]

    def refresh_relays(self, timeout: float, required: bool = False) -> None:
        """Relays for the nodes there are now (NodeRelays.refresh), with their addresses. A
        relay that does not start in `timeout` is a RunFailed when `required` (start-up, before
        any collector), else a warning: it is forgotten, to be started again next time."""
        before = set(self.relays.handles)
        started = self.relays.refresh()
        for name in before - set(self.relays.handles):  # their nodes have left
            self.addresses.pop(name, None)
        calls = [(name, relay.address.remote()) for name, relay in started.items()]
        try:
            self.addresses.update(zip(started, wait(calls, "relay start", timeout)))
        except RunFailed as e:
            if required:
                raise
            log.warning("a policy relay did not start (%s); trying again after the next "
                        "cycle", e)
            for name, relay in started.items():
                del self.relays.handles[name]
                ray.kill(relay)

    def named(self) -> list[tuple[str, "ray.actor.ActorHandle"]]:
        return [("replay", self.replay), ("policyserver", self.policy), ("learner", self.learner),
                *((f"actor-{i}", a) for i, a in enumerate(self.actors)),
                *self.relays.handles.items(),
                *((("evaluator", self.evaluator),) if self.evaluator else ())]
