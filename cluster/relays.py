"""Policy relays of a multi-node run (cluster.policy_relays): one `PolicyRelayWorker` on each
node other than the policy server's that collectors may run on, started before the
collectors, which find their node's relay in the addresses they are given."""

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


def start_relays(c: ClusterConfig, run: str, policy: "ray.actor.ActorHandle", upstream: str,
                 credentials: dict[str, bytes], restarts: dict
                 ) -> dict[str, "ray.actor.ActorHandle"]:
    """{relay name: handle} for the nodes `relay_nodes` picks; none when relays are off or
    there are no collectors."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not c.policy_relays or c.num_actors == 0:
        return {}
    server_node = ray.get(policy.node.remote())
    return {relay_name(node): ray.remote(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        **restarts)(PolicyRelayWorker).remote(run, c, upstream, credentials)
        for node in relay_nodes(ray.nodes(), server_node, c.actor_resource)}
