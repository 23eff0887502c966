"""The gRPC policy server and its clients.

The learner publishes versioned snapshots; each subscriber holds one server stream and receives
every new version as it is published, without polling. Snapshots are kept on disk under the run's
`policies/` folder, so a restarted server serves what it had.

Plaintext, bound to loopback: TLS, tokens and the robot gateway come with the gateway work.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc

from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.snapshot import Snapshot, SnapshotError, load_snapshot, save_snapshot

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Client keepalive no faster than the server permits (reliability.md §3.4).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
RPC_TIMEOUT_SECONDS = 60.0


def to_message(snapshot: Snapshot) -> pb.Snapshot:
    return pb.Snapshot(version=snapshot.version, metadata_json=json.dumps(dict(snapshot.metadata)),
                       weights=snapshot.weights, sha256=snapshot.sha256)


def from_message(message: pb.Snapshot) -> Snapshot:
    """Decodes a snapshot message and checks its hash."""
    snap = Snapshot(int(message.version), json.loads(message.metadata_json), message.weights)
    snap.verify(message.sha256)
    return snap


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """Holds the versions and wakes subscriber streams when a new one arrives."""

    def __init__(self, directory: str | Path):
        self._directory = Path(directory)
        self._cond = threading.Condition()
        self._messages: dict[int, pb.Snapshot] = {}
        self._stopping = False
        for meta_path in sorted(self._directory.glob("v*.json")):
            self._messages[int(meta_path.stem[1:])] = to_message(load_snapshot(meta_path))

    @property
    def latest_version(self) -> int:
        with self._cond:
            return max(self._messages, default=0)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def Publish(self, request: pb.Snapshot, context: grpc.ServicerContext) -> pb.PublishReply:
        try:
            snapshot = from_message(request)
        except (SnapshotError, ValueError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self._cond:
            latest = max(self._messages, default=0)
            if snapshot.version <= latest:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"version {snapshot.version} does not advance latest {latest}")
            save_snapshot(snapshot, self._directory)
            self._messages[snapshot.version] = request
            self._cond.notify_all()
        log.info("published policy v%d (%d bytes)", snapshot.version, len(request.weights))
        return pb.PublishReply(version=snapshot.version)

    def Subscribe(self, request: pb.SubscribeRequest,
                  context: grpc.ServicerContext) -> Iterator[pb.Snapshot]:
        sent = int(request.after_version)
        while context.is_active():
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stopping or max(self._messages, default=0) > sent, timeout=1.0)
                if self._stopping:
                    return
                latest = max(self._messages, default=0)
                message = self._messages[latest] if latest > sent else None
            if message is not None:
                sent = latest
                yield message

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> pb.Snapshot:
        with self._cond:
            version = int(request.version) or max(self._messages, default=0)
            message = self._messages.get(version)
        if message is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no policy version {version}")
        return message

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        with self._cond:
            infos = [pb.VersionInfo(version=v, sha256=m.sha256, metadata_json=m.metadata_json)
                     for v, m in sorted(self._messages.items())]
        return pb.ListReply(versions=infos)


class PolicyServer:
    """A running gRPC policy server.

    Usage:
        server = PolicyServer(run_dir / "policies", host="127.0.0.1", port=0)
        address = server.start()          # "127.0.0.1:<port>"
        ...
        server.stop()
    """

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0):
        self._servicer = PolicyServicer(directory)
        self._host, self._port = host, port
        self._server: grpc.Server | None = None

    def start(self) -> str:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32),
                                   options=SERVER_OPTIONS)
        pb_grpc.add_PolicyServiceServicer_to_server(self._servicer, self._server)
        port = self._server.add_insecure_port(f"{self._host}:{self._port}")
        if port == 0:
            raise RuntimeError(f"policy server could not bind {self._host}:{self._port}")
        self._server.start()
        self.address = f"{self._host}:{port}"
        log.info("policy server listening on %s", self.address)
        return self.address

    @property
    def latest_version(self) -> int:
        return self._servicer.latest_version

    def stop(self, grace_seconds: float = 1.0) -> None:
        self._servicer.stop()
        if self._server is not None:
            self._server.stop(grace_seconds).wait()


def publish(address: str, snapshot: Snapshot, timeout: float = RPC_TIMEOUT_SECONDS) -> int:
    """Sends a snapshot to the server; returns the version it now serves."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        reply = pb_grpc.PolicyServiceStub(channel).Publish(to_message(snapshot), timeout=timeout)
    return int(reply.version)


def fetch(address: str, version: int = 0, timeout: float = RPC_TIMEOUT_SECONDS) -> Snapshot:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        message = pb_grpc.PolicyServiceStub(channel).Fetch(pb.FetchRequest(version=version),
                                                           timeout=timeout)
    return from_message(message)


class PolicySubscriber:
    """Keeps the newest snapshot pushed by the server, on a background thread.

    Reconnects with backoff when the stream breaks, resuming after the version it holds. Refuses
    snapshots whose hash is wrong or whose version goes backwards, and keeps the one it had.

    Usage:
        sub = PolicySubscriber(address, client_id="actor-0").start()
        snapshot = sub.latest()            # None until the first version arrives
        sub.wait_for_version(3, timeout=60)
    """

    def __init__(self, address: str, client_id: str):
        self._address, self._client_id = address, client_id
        self._cond = threading.Condition()
        self._latest: Snapshot | None = None
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._thread = threading.Thread(target=self._run, name=f"subscribe-{client_id}",
                                        daemon=True)

    def start(self) -> "PolicySubscriber":
        self._thread.start()
        return self

    def latest(self) -> Snapshot | None:
        with self._cond:
            return self._latest

    def wait_for_version(self, version: int, timeout: float) -> Snapshot:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._latest is not None and self._latest.version >= version, timeout)
            if not ok:
                held = self._latest.version if self._latest else 0
                raise TimeoutError(f"{self._client_id}: policy v{version} did not arrive within "
                                   f"{timeout:.0f}s (holding v{held})")
            return self._latest

    def close(self) -> None:
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
        self._thread.join(timeout=5)

    def _accept(self, message: pb.Snapshot) -> None:
        try:
            snapshot = from_message(message)
        except (SnapshotError, ValueError) as e:
            log.error("%s: refused snapshot v%d: %s", self._client_id, message.version, e)
            return
        with self._cond:
            held = self._latest.version if self._latest else 0
            if snapshot.version <= held:
                log.warning("%s: refused version regression v%d <= v%d", self._client_id,
                            snapshot.version, held)
                return
            self._latest = snapshot
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._channel = grpc.insecure_channel(self._address, options=CHANNEL_OPTIONS)
                stub = pb_grpc.PolicyServiceStub(self._channel)
                held = self.latest()
                request = pb.SubscribeRequest(after_version=held.version if held else 0,
                                              client_id=self._client_id)
                for message in stub.Subscribe(request, wait_for_ready=True):
                    self._accept(message)
                    backoff = 0.1
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                log.warning("%s: policy stream broke (%s); reconnecting", self._client_id,
                            e.code() if hasattr(e, "code") else e)
            finally:
                if self._channel is not None:
                    self._channel.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
