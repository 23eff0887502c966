"""Which Ray nodes get a policy relay (cluster/relays.py)."""

from cluster.relays import relay_nodes
from cluster.workers import relay_name


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 2.0, **resources}}


def test_every_live_node_but_the_servers_that_can_run_collectors_gets_a_relay():
    nodes = [_node("aa", head=1), _node("bb", worker=1), _node("cc", worker=1),
             _node("dd", alive=False, worker=1), _node("ee")]
    assert relay_nodes(nodes, "aa", "") == ["bb", "cc", "ee"]
    assert relay_nodes(nodes, "aa", "worker") == ["bb", "cc"]  # collectors run there only
    assert relay_nodes(nodes[:1], "aa", "") == []  # one node: collectors read the server's files
    assert relay_name("0123456789abcdef0123") == "relay-0123456789ab"


def test_relays_off_start_none_and_ask_no_node():
    """cluster.policy_relays: false: no relay anywhere (collectors on other nodes then receive
    their own copies); refresh asks Ray nothing (there is no Ray in this test)."""
    from cluster.config import ClusterConfig
    from cluster.relays import NodeRelays

    off = ClusterConfig(policy_relays=False)
    assert not NodeRelays.wanted(off) and NodeRelays.wanted(ClusterConfig())
    relays = NodeRelays(off, "run", "", "", {}, {})
    assert relays.refresh() == {} and relays.handles == {}
