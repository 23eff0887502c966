"""A policy relay: a policy server on one host fed by a single subscription to another.

Subscribers on a host other than the policy server's receive every version as data parts, one
copy per subscriber over the network; subscribers on the server's host map its file instead
(local_read). A relay on the other host takes the stream once, as one subscriber, and stores
and serves it like a policy server of its own (`PolicyServer`, `PolicyStore.receive`): its
subscribers read its files locally. As Ray's object store does across nodes, each version
crosses the network once per host.

Nothing is held earlier than upstream holds it: the relay passes each data part on as it
arrives (its subscribers check it as it comes), and commits the version only after upstream's
end part says upstream has stored it and the relay has stored it too. A version upstream drops
is dropped here. A fleet pin upstream (an operator's rollback) is mirrored as a fleet pin here.
The relay's server refuses Publish, Pin and Unpin: only upstream decides what it serves.

Usage:
    relay = PolicyRelay("10.0.0.5:50051", "/scratch/relay").start()
    sub = PolicySubscriber(relay.address, "actor-3", local_read=True).start()
    relay.stop()
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry

from policies.client import PLAINTEXT, ready_channel, resolved
from policies.limits import GatewayLimits
from policies.proto import policy_pb2 as pb
from policies.security import ClientSecurity, ServerSecurity
from policies.server import PLAINTEXT_LOOPBACK, PolicyServer
from policies.snapshot import SnapshotError
from policies.stream import SERVICE, Frame, Part, header_frame, parse_frame, read_snapshots
from policies.wire import MAX_SNAPSHOT_BYTES, WireError

log = logging.getLogger(__name__)


class _Dropped(Exception):
    """Upstream did not store the version it was relaying."""


class PolicyRelay:
    """A `PolicyServer` on this host whose versions come from `upstream` (one Subscribe stream,
    as client `client_id`), reconnecting with backoff and resuming after its latest version."""

    def __init__(self, upstream: str, directory: str | Path, host: str = "127.0.0.1",
                 port: int = 0, client_id: str = "relay",
                 upstream_security: ClientSecurity = PLAINTEXT,
                 security: ServerSecurity = PLAINTEXT_LOOPBACK,
                 limits: GatewayLimits = GatewayLimits(),
                 max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES,
                 resolve: Callable[[], tuple[str, str] | None] | None = None,
                 registry: CollectorRegistry | None = None, keep_versions: int = 4):
        # resolve: upstream's current (address, incarnation), asked after its stream breaks (a
        # restarted server may have moved); registry: the relay's server metrics go there;
        # keep_versions: the newest versions kept in `directory` (and the pinned one), older
        # ones deleted: upstream keeps every version, a node's disk need not
        self._keep = keep_versions
        self.server = PolicyServer(directory, host=host, port=port, security=security,
                                   limits=limits, registry=registry, relayed_from=upstream)
        self._resolve = resolve
        self._store = self.server.store
        self._upstream, self._client_id = upstream, client_id
        self._upstream_security, self._max_bytes = upstream_security, max_snapshot_bytes
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self.address = ""
        self.relayed = 0  # versions stored from upstream
        self.dropped = 0  # versions upstream did not store
        self.reconnects = 0  # upstream streams reopened after they ended or broke
        self._thread = threading.Thread(target=self._run, name=f"relay-{client_id}",
                                        daemon=True)

    def start(self) -> "PolicyRelay":
        self.address = self.server.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
        self._thread.join(timeout=10)
        self.server.stop()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._channel, self._upstream = ready_channel(
                    self._upstream, self._upstream_security, self._stop, self._resolve,
                    self._client_id)
                if self._channel is None:  # stopped
                    return
                subscribe = self._channel.unary_stream(
                    f"/{SERVICE}/Subscribe",
                    request_serializer=pb.SubscribeRequest.SerializeToString)  # raw frames
                frames = iter(subscribe(pb.SubscribeRequest(
                    after_version=self._store.latest, client_id=self._client_id)))
                for frame in frames:
                    part = parse_frame(frame)
                    kind = "data" if isinstance(part, memoryview) else part.WhichOneof("part")
                    if kind == "header":
                        self._take(part.header, frames)
                        backoff = 0.1
                    elif kind != "heartbeat":
                        raise WireError(f"a {kind} part arrived before its header")
            except (WireError, SnapshotError, ValueError) as e:
                log.error("%s: refused a version from %s: %s", self._client_id,
                          self._upstream, e)
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                log.warning("%s: upstream stream broke (%s); reconnecting", self._client_id,
                            e.code() if hasattr(e, "code") else e)
            except Exception:  # e.g. its disk: the thread must live on, or versions stop here
                log.exception("%s: relaying from upstream failed; reconnecting", self._client_id)
            finally:
                if self._channel is not None:
                    self._channel.close()
            if self._stop.wait(backoff):
                return
            self.reconnects += 1
            backoff = min(2 * backoff, 2.0)
            found = resolved(self._resolve, self._client_id)
            if found:
                self._upstream = found[0]

    def _take(self, header: pb.SnapshotHeader, frames: Iterator[Frame]) -> None:
        """One version's stream from upstream, header already read."""
        store = self._store
        if header.version in store.infos:  # one it has: upstream changed the fleet's pin
            _skip(header, frames)
        elif header.version < store.latest:  # a pin to one it deleted: stored again, aside
            parts = itertools.chain([pb.SnapshotChunk(header=header)],
                                    (part for _, part in _parts(header, frames)))
            for snapshot, _ in read_snapshots(parts, self._max_bytes):
                store.restore(snapshot)
        else:
            try:
                store.receive(_version_frames(header, frames), self._max_bytes,
                              wait_seconds=60.0)
            except _Dropped as e:
                self.dropped += 1
                log.warning("%s: upstream did not store v%d: %s", self._client_id,
                            header.version, e)
                return
            self.relayed += 1
            log.info("%s: relayed v%d (%d bytes)", self._client_id, header.version,
                     header.total_bytes)
        try:  # upstream's pin for this relay, mirrored for the relay's whole fleet
            if header.pinned:
                store.pin(header.version, "")
            elif store.fleet_pin:
                store.unpin("")
        except KeyError:  # a version this relay never stored (it was newer then)
            log.error("%s: upstream pins v%d, which this relay does not hold", self._client_id,
                      header.version)
        keep = set(sorted(store.infos)[-self._keep:]) | {store.fleet_pin}
        for version in sorted(set(store.infos) - keep):
            store.forget(version)


def _version_frames(header: pb.SnapshotHeader, frames: Iterator[Frame]) -> Iterator[Frame]:
    """What a publisher would send for the version `header` opens: its header (no sha256 and
    no paths of upstream's files), each data frame unchanged, and upstream's end part once
    upstream has stored it. Raises _Dropped when upstream did not store it, WireError when the
    stream ends or carries something else first."""
    yield header_frame(header.version, header.metadata_json, header.total_bytes)
    for frame, part in _parts(header, frames):
        if not isinstance(part, memoryview):
            if part.WhichOneof("part") != "end":
                raise WireError(f"a {part.WhichOneof('part')} part inside v{header.version}")
            if not part.end.committed:
                raise _Dropped(part.end.reason)
        yield frame


def _parts(header: pb.SnapshotHeader, frames: Iterator[Frame]) -> Iterator[tuple[Frame, Part]]:
    """(frame, its parsed part) of the version `header` opens, heartbeats left out, up to and
    with its end part. Raises WireError when the stream ends first."""
    for frame in frames:
        part = parse_frame(frame)
        kind = "data" if isinstance(part, memoryview) else part.WhichOneof("part")
        if kind != "heartbeat":
            yield frame, part
        if kind == "end":
            return
    raise WireError(f"upstream's stream ended inside v{header.version}")


def _skip(header: pb.SnapshotHeader, frames: Iterator[Frame]) -> None:
    for _ in _parts(header, frames):
        pass


__all__ = ["PolicyRelay"]
