"""Policy relays of a multi-node run (cluster.policy_relays): one `PolicyRelayWorker` on each
node other than the policy server's that collectors may run on, started before the
collectors, which find their node's relay in the addresses they are given or, started later,
in run storage (`<run>/addresses/relay-<node>.json`)."""

from __future__ import annotations

import ray

from cluster.config import ClusterConfig
from cluster.workers import PolicyRelayWorker, relay_name


def relay_nodes(nodes: list[dict], server_node: str, actor_resource: str) -> list[str]:
    """The Ray nodes (`ray.nodes()` entries) that get a relay: alive, not the policy server's,
    and able to run collectors (holding some of `actor_resource` when one is set)."""
    return sorted(n["NodeID"] for n in nodes
                  if n.get("Alive") and n["NodeID"] != server_node
                  and (not actor_resource or n.get("Resources", {}).get(actor_resource, 0) > 0))


class NodeRelays:
    """The run's relays, {relay name: handle} in `handles`. `refresh` (at the start and after
    every cycle) forgets the relays of nodes that have left the cluster (a relay is pinned to
    its node, so Ray cannot restart it elsewhere) and starts one on each eligible node that
    has none yet: one that joined later (an autoscaler's, or a replaced machine), where
    collectors Ray restarts find it through run storage."""

    def __init__(self, c: ClusterConfig, run: str, server_node: str, upstream: str,
                 credentials: dict[str, bytes], restarts: dict):
        # server_node: the Ray node id of the policy server (no relay there; "" when off)
        self._args, self._restarts = (run, c, upstream, credentials), restarts
        self._actor_resource = c.actor_resource
        self._on = self.wanted(c)
        self._server_node = server_node
        self.handles: dict[str, "ray.actor.ActorHandle"] = {}

    @staticmethod
    def wanted(c: ClusterConfig) -> bool:
        """Whether a run with this config has relays (they serve collectors)."""
        return c.policy_relays and c.num_actors > 0

    def refresh(self) -> dict[str, "ray.actor.ActorHandle"]:
        """Updates `handles`; returns the relays it started."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self._on:
            return {}
        nodes = {relay_name(n): n for n in relay_nodes(ray.nodes(), self._server_node,
                                                      self._actor_resource)}
        self.handles = {name: h for name, h in self.handles.items() if name in nodes}
        started = {name: ray.remote(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            **self._restarts)(PolicyRelayWorker).remote(*self._args)
            for name, node in nodes.items() if name not in self.handles}
        self.handles.update(started)
        return started
