"""A policy relay (policies/relay.py): a second policy server fed by one subscription to the
first, whose subscribers read its files locally. Versions pass through while they arrive,
are held only once both servers stored them, dropped ones stay dropped, pins are mirrored,
and a restarted relay resumes after what it stored."""

import contextlib
import mmap
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from policies.client import PolicyClient, PolicySubscriber, _frame_calls
from policies.relay import PolicyRelay
from policies.server import PolicyServer
from policies.snapshot import Snapshot
from policies.stream import end_frame, publish_frames
from tests.processes import until

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(version: int) -> Snapshot:
    torch.manual_seed(version)
    return Snapshot.from_state_dict(version, {"w": torch.randn(300_000), "b": torch.ones(3)},
                                    {"cycle": version})


@pytest.fixture()
def upstream(tmp_path):
    registry = CollectorRegistry()
    server = PolicyServer(tmp_path / "upstream", port=0, heartbeat_seconds=0.2,
                          registry=registry)
    address = server.start()
    channel = grpc.insecure_channel(address)
    yield server, address, _frame_calls(channel), registry
    channel.close()
    server.stop()


@contextlib.contextmanager
def _relayed(address: str, folder, **kwargs) -> Iterator[tuple[PolicyRelay, PolicySubscriber]]:
    """A relay of `address` and one local_read subscriber of the relay, stopped afterwards."""
    relay = PolicyRelay(address, folder, **kwargs).start()
    sub = PolicySubscriber(relay.address, "actor-0", local_read=True).start()
    try:
        yield relay, sub
    finally:
        sub.close()
        relay.stop()


@contextlib.contextmanager
def _restarted(folder, moved: list[tuple[str, str]]) -> Iterator[str]:
    """A new incarnation of the upstream server on its folder, at another port, announced in
    `moved` (what the relay's `resolve` reads, as a run's addresses/); its address."""
    again = PolicyServer(folder, port=0, heartbeat_seconds=0.2)
    moved.append((again.start(), "incarnation-2"))
    try:
        yield moved[0][0]
    finally:
        again.stop()


def _mapped(snapshot: Snapshot) -> bool:
    """Whether the snapshot's weights are a mapped file (a local read), not a received copy."""
    return isinstance(snapshot.weights.obj.base.obj, mmap.mmap)


def test_a_relay_serves_upstream_versions_from_its_own_files(upstream, tmp_path):
    server, address, calls, registry = upstream
    relay = PolicyRelay(address, tmp_path / "relay", client_id="relay-node-1").start()
    subs = [PolicySubscriber(relay.address, f"actor-{i}", local_read=True).start()
            for i in range(3)]
    try:
        for version in (1, 2):
            snapshot = _snapshot(version)
            calls["Publish"](publish_frames(snapshot), timeout=30)
            for sub in subs:
                held = sub.wait_for_version(version, timeout=30)
                assert held.sha256 == snapshot.sha256
                assert bytes(held.weights) == snapshot.weights
                assert sub.local_read and _mapped(held)  # the relay's file, no copy
        # Counted as each call returns, which may be just after the subscribers hold it.
        until(lambda: relay.relayed == 2, "two versions relayed", timeout=30, poll=0.01)
        assert relay.server.latest_version == 2
        assert sorted(p.name for p in (tmp_path / "relay").glob("v*")) == [
            "v000001.json", "v000001.safetensors", "v000002.json", "v000002.safetensors"]
        # Upstream has one subscriber, the relay, and sent each version once.
        assert registry.get_sample_value("pacflow_policy_subscribers") == 1
        until(lambda: registry.get_sample_value("pacflow_policy_push_seconds_count") == 2,
              "two pushes counted upstream", timeout=30, poll=0.01)
    finally:
        for sub in subs:
            sub.close()
        relay.stop()


def test_a_version_passes_the_relay_while_it_arrives_and_is_held_once_stored(upstream,
                                                                            tmp_path):
    server, address, calls, registry = upstream
    with _relayed(address, tmp_path / "relay") as (relay, sub):
        calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
        sub.wait_for_version(1, timeout=30)
        snapshot = _snapshot(2)
        frames = list(publish_frames(snapshot, chunk_bytes=64 << 10))
        release = threading.Event()

        def held_back():
            yield from frames[:4]  # the header and three data parts, then the publisher waits
            assert release.wait(30)
            yield from frames[4:]

        publisher = threading.Thread(target=lambda: calls["Publish"](held_back(), timeout=60))
        publisher.start()
        # The relay's server is receiving v2 from upstream while upstream receives it.
        until(lambda: relay.server.store.inflight is not None and
              relay.server.store.inflight.version == 2, "v2 in flight at the relay",
              timeout=30, poll=0.01)
        assert server.latest_version == 1 and relay.server.latest_version == 1
        assert sub.latest().version == 1
        release.set()
        publisher.join()
        assert sub.wait_for_version(2, timeout=30).sha256 == snapshot.sha256


def test_a_version_upstream_drops_is_dropped_by_the_relay(upstream, tmp_path, caplog):
    server, address, calls, registry = upstream
    with _relayed(address, tmp_path / "relay") as (relay, sub):
        calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
        sub.wait_for_version(1, timeout=30)
        bad = list(publish_frames(_snapshot(2)))
        bad[-1] = end_frame(2, "0" * 64)  # upstream refuses it after relaying its bytes
        with pytest.raises(grpc.RpcError):
            calls["Publish"](iter(bad), timeout=30)
        until(lambda: relay.dropped == 1, "the relay's drop", timeout=30, poll=0.01)
        until(lambda: sub.dropped == 1, "the subscriber's drop", timeout=30, poll=0.01)
        assert relay.server.latest_version == 1 and sub.latest().version == 1
        assert not list((tmp_path / "relay").glob("v000002*"))
        # the line docs/operations.md lists for it
        assert any(r.name == "policies.relay" and ": upstream did not store v2: " in r.getMessage()
                   for r in caplog.records), caplog.text
        good = _snapshot(2)
        calls["Publish"](publish_frames(good), timeout=30)
        assert sub.wait_for_version(2, timeout=30).sha256 == good.sha256


def test_a_fleet_pin_upstream_reaches_the_relays_subscribers(upstream, tmp_path):
    server, address, calls, registry = upstream
    with _relayed(address, tmp_path / "relay") as (relay, sub):
        for version in (1, 2):
            calls["Publish"](publish_frames(_snapshot(version)), timeout=30)
        sub.wait_for_version(2, timeout=30)
        with PolicyClient(address) as client:
            client.pin(1)  # the operator's rollback, for the whole fleet
            until(lambda: sub.latest().version == 1, "the rollback behind the relay",
                  timeout=30, poll=0.01)
            assert relay.server.store.fleet_pin == 1
            client.unpin()
        until(lambda: sub.latest().version == 2, "v2 again after the unpin", timeout=30,
              poll=0.01)
        assert relay.server.store.fleet_pin == 0


def test_a_restarted_relay_resumes_after_what_it_stored(upstream, tmp_path):
    server, address, calls, registry = upstream
    relay = PolicyRelay(address, tmp_path / "relay").start()
    calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
    until(lambda: relay.server.latest_version == 1, "v1 at the relay", timeout=30, poll=0.01)
    relay.stop()
    calls["Publish"](publish_frames(_snapshot(2)), timeout=30)
    with _relayed(address, tmp_path / "relay") as (relay, sub):
        assert 1 in relay.server.store.infos  # from its folder, not from upstream again
        assert sub.wait_for_version(2, timeout=30).sha256 == _snapshot(2).sha256
        until(lambda: relay.relayed == 1, "v2 relayed", timeout=30, poll=0.01)
        assert relay.server.store.infos.keys() == {1, 2}


def test_a_relay_finds_a_restarted_upstream_that_moved(upstream, tmp_path):
    """`resolve` (the run's `addresses/policyserver.json`) names the new incarnation's address
    after the stream broke; the relay continues there."""
    server, address, calls, _ = upstream
    moved: list[tuple[str, str]] = []
    with _relayed(address, tmp_path / "relay",
                  resolve=lambda: moved[0] if moved else None) as (relay, sub):
        calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
        sub.wait_for_version(1, timeout=30)
        server.stop()
        with _restarted(tmp_path / "upstream", moved) as again:
            with PolicyClient(again) as client:
                client.publish(_snapshot(2))
            assert sub.wait_for_version(2, timeout=60).sha256 == _snapshot(2).sha256
            assert relay.reconnects >= 1


def _policy_server_process(folder) -> tuple[subprocess.Popen, str]:
    """A policy server in its own process (to be SIGKILLed), on a free port: (process, address)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.children", "policy-server",
                             str(folder), "0.2"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("through", ["relay", "subscriber"])
def test_a_killed_server_that_comes_back_elsewhere_is_found(tmp_path, caplog, through):
    """A server process that dies (SIGKILL) breaks the stream with an error, unlike a stopped
    server, which ends it: a relay logs the line docs/operations.md lists. Its next
    incarnation listens at another address, announced only after the client has begun
    waiting on the old one: the client looks the address up again while it waits, and takes
    the next version there (it used to wait on the old address for ever). Until then the
    lookup fails (run storage unreadable for a while): logged, and asked again (a raising
    lookup used to end the receiving thread)."""
    first, address = _policy_server_process(tmp_path / "upstream")
    moved: list[tuple[str, str]] = []

    def resolve() -> tuple[str, str]:  # the run's addresses/ file
        if not moved:
            raise OSError("storage unreachable")
        return moved[0]
    try:
        with contextlib.ExitStack() as stack:
            if through == "relay":
                _, sub = stack.enter_context(_relayed(address, tmp_path / "relay",
                                                      resolve=resolve))
            else:
                sub = PolicySubscriber(address, "actor-0", resolve=resolve).start()
                stack.callback(sub.close)
            with PolicyClient(address) as client:
                client.publish(_snapshot(1))
            sub.wait_for_version(1, timeout=30)
            first.kill()
            first.wait()
            line = r": upstream stream broke \(.*\); reconnecting" if through == "relay" \
                else r"actor-0: policy stream broke \(.*\); reconnecting"
            until(lambda: re.search(line, caplog.text), "the broken stream's line", timeout=30,
                  poll=0.05)
            second, again = _policy_server_process(tmp_path / "upstream")
            try:
                moved.append((again, "incarnation-2"))
                with PolicyClient(again) as client:
                    client.publish(_snapshot(2))
                assert sub.wait_for_version(2, timeout=60).sha256 == _snapshot(2).sha256
            finally:
                second.kill()
                second.wait()
    finally:
        first.kill()
        first.wait()
    assert "policy server moved to " + again in caplog.text
    assert "looking up the policy server's address failed: storage unreachable" in caplog.text


def test_a_relays_server_refuses_publish_and_pins(upstream, tmp_path):
    """Only upstream decides what a relay serves: a process on the relay's host cannot
    publish its own version to the relay's collectors, nor pin one."""
    server, address, calls, _ = upstream
    relay = PolicyRelay(address, tmp_path / "relay").start()
    try:
        calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
        until(lambda: relay.server.latest_version == 1, "v1 at the relay", timeout=30, poll=0.01)
        with PolicyClient(relay.address, timeout=30) as client:
            for call in (lambda: client.publish(_snapshot(5)), lambda: client.pin(1),
                         lambda: client.unpin()):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert f"relays the versions and pins of {address}" in err.value.details()
            assert [v.version for v in client.list().versions] == [1]
        assert relay.server.store.fleet_pin == 0
        assert not list((tmp_path / "relay").glob("v000005*"))
    finally:
        relay.stop()


def test_a_relay_keeps_its_newest_versions_and_fetches_a_pinned_older_one_again(upstream,
                                                                                 tmp_path):
    """Upstream keeps every version, a node's scratch need not: the relay deletes all but its
    newest `keep_versions` (and the pinned one); a rollback to one it deleted stores it again."""
    server, address, calls, _ = upstream

    def stored() -> list[int]:  # versions with a file in the relay's folder
        return sorted({int(p.name[1:7]) for p in (tmp_path / "relay").glob("v*")})

    with _relayed(address, tmp_path / "relay", keep_versions=2) as (relay, sub):
        held = []  # what a collector still acting with v1 holds: the relay's file, mapped
        for version in (1, 2, 3, 4):
            calls["Publish"](publish_frames(_snapshot(version)), timeout=30)
            held.append(sub.wait_for_version(version, timeout=30))
        until(lambda: stored() == [3, 4], "v1 and v2 deleted", timeout=30, poll=0.01)
        assert _mapped(held[0])
        kept, sent = held[0].state_dict(), _snapshot(1).state_dict()  # pages of a deleted file
        assert kept.keys() == sent.keys() and all(torch.equal(kept[k], sent[k]) for k in sent)
        with PolicyClient(address) as client:
            client.pin(1)  # a rollback past what the relay kept
            until(lambda: sub.latest().version == 1, "v1 behind the relay", timeout=30,
                  poll=0.01)
            assert sub.latest().sha256 == _snapshot(1).sha256
            assert stored() == [1, 3, 4]
            assert relay.server.latest_version == 4 and relay.server.store.fleet_pin == 1
            client.unpin()
        until(lambda: sub.latest().version == 4, "v4 after the unpin", timeout=30, poll=0.01)
        calls["Publish"](publish_frames(_snapshot(5)), timeout=30)
        assert sub.wait_for_version(5, timeout=30).sha256 == _snapshot(5).sha256
        until(lambda: stored() == [4, 5], "v1 and v3 deleted", timeout=30, poll=0.01)


def test_an_upstream_that_dies_mid_version_leaves_nothing_partial_behind_the_relay(upstream,
                                                                                   tmp_path):
    """Upstream stops while a version is passing through the relay: the relay's subscribers
    drop it, nothing of it is stored at the relay, and the version published again to the
    restarted upstream arrives whole."""
    server, address, calls, _ = upstream
    moved: list[tuple[str, str]] = []
    with _relayed(address, tmp_path / "relay",
                  resolve=lambda: moved[0] if moved else None) as (relay, sub):
        calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
        sub.wait_for_version(1, timeout=30)
        frames = list(publish_frames(_snapshot(2), chunk_bytes=64 << 10))
        release = threading.Event()

        def held_back():
            yield from frames[:4]
            release.wait(30)
            yield from frames[4:]

        publisher = threading.Thread(target=lambda: pytest.raises(
            grpc.RpcError, calls["Publish"], held_back(), timeout=60))
        publisher.start()
        until(lambda: relay.server.store.inflight is not None, "v2 in flight at the relay",
              timeout=30, poll=0.01)
        server.stop()  # upstream goes away mid-version
        release.set()
        publisher.join()
        until(lambda: sub.dropped == 1, "the subscriber's drop", timeout=30, poll=0.01)
        assert relay.server.latest_version == 1 and sub.latest().version == 1
        assert sorted(p.name for p in (tmp_path / "relay").iterdir()) == [
            "v000001.json", "v000001.safetensors"]
        with _restarted(tmp_path / "upstream", moved) as again:
            with PolicyClient(again) as client:
                client.publish(_snapshot(2))
            assert sub.wait_for_version(2, timeout=60).sha256 == _snapshot(2).sha256
