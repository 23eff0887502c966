"""Clients of the policy service: one-shot calls (every one with a deadline) and the subscriber
that actors and robots use to receive new versions in the background."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

import grpc
import numpy as np

from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.security import ClientSecurity, channel_credentials
from policies.snapshot import Snapshot, SnapshotError
from policies.stream import RECEIVE_WINDOW_BYTES, SERVICE, LocalReadError, SpareBuffer, \
    parse_frame, publish_frames, read_snapshots
from policies.wire import WireError, episode_bytes, episode_chunks
from replay.spec import Episode

log = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS = 60.0  # deadline of one-shot calls (a large Publish or Fetch included)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    # No faster than the server permits (reliability.md §3.4), and a frozen server is noticed
    # in seconds, not after gRPC's default one-minute ping timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    # Keep pinging on a stream with no data (gRPC stops after 2 pings by default), which the
    # server's ping policy permits: tests/reliability S17 holds such a stream for 60 s.
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect within seconds after a server restart (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # A fixed receive window per stream instead of one that gRPC's BDP probing grows: with it,
    # subscribers in Ray workers peaked 49-105 MB over their two snapshot buffers while taking
    # 128-400 MB versions (4 subscribers, 2 cores), 18-25 MB with this window, as fast
    # (docs/benchmarks.md, policy push).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
]


PLAINTEXT = ClientSecurity()


def _frame_calls(channel: grpc.Channel) -> dict[str, grpc.MultiCallable]:
    """Publish, Subscribe and Fetch carrying raw frames (policies/stream.py): a data part's bytes
    are not copied out of the received message."""
    return {
        "Publish": channel.stream_unary(f"/{SERVICE}/Publish",
                                        response_deserializer=pb.PublishReply.FromString),
        "Subscribe": channel.unary_stream(
            f"/{SERVICE}/Subscribe", request_serializer=pb.SubscribeRequest.SerializeToString,
            response_deserializer=parse_frame),
        "Fetch": channel.unary_stream(f"/{SERVICE}/Fetch",
                                      request_serializer=pb.FetchRequest.SerializeToString,
                                      response_deserializer=parse_frame)}


def open_channel(address: str, security: ClientSecurity = PLAINTEXT) -> grpc.Channel:
    """A channel with our limits and keepalive; TLS, client certificate and token per
    `security` (plaintext when it names no CA)."""
    creds = channel_credentials(security)
    if creds is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", security.server_name)]
                                 if security.server_name else [])
    return grpc.secure_channel(address, creds, options=options)


READY_POLL_SECONDS = 0.2  # a connecting stream checks for stop this often
RESOLVE_SECONDS = 5.0  # while its server does not answer, a stream looks its address up this often


def resolved(resolve: Callable[[], tuple[str, str] | None] | None, who: str
             ) -> tuple[str, str] | None:
    """What `resolve` says now; None when there is none or it fails (run storage that cannot be
    read this moment: logged, and asked again on the next round)."""
    if resolve is None:
        return None
    try:
        return resolve()
    except Exception as e:
        log.warning("%s: looking up the policy server's address failed: %s", who, e)
        return None


def ready_channel(address: str, security: ClientSecurity, stop: threading.Event,
                  resolve: Callable[[], tuple[str, str] | None] | None, who: str
                  ) -> tuple[grpc.Channel | None, str]:
    """(channel, address) once the server at `address` answers; (None, address) once `stop`
    is set. While it does not answer, `resolve` is asked every RESOLVE_SECONDS: a restarted
    server that could not bind its old port announces another address, and waiting on the old
    one would wait forever."""
    channel = open_channel(address, security)
    ready, asked = grpc.channel_ready_future(channel), time.monotonic()
    while not stop.is_set():
        try:
            ready.result(timeout=READY_POLL_SECONDS)
            return channel, address
        except grpc.FutureTimeoutError:
            pass
        if resolve is None or time.monotonic() - asked < RESOLVE_SECONDS:
            continue
        found, asked = resolved(resolve, who), time.monotonic()
        if found is not None and found[0] != address:
            log.warning("%s: policy server moved to %s", who, found[0])
            ready.cancel()
            channel.close()
            address = found[0]
            channel = open_channel(address, security)
            ready = grpc.channel_ready_future(channel)
    ready.cancel()
    channel.close()
    return None, address


class PolicyClient:
    """One channel to the policy service.

    Usage:
        with PolicyClient(address) as client:
            client.publish(snapshot)
            client.pin(3, client_id="robot-7")
    """

    def __init__(self, address: str, timeout: float = RPC_TIMEOUT_SECONDS,
                 security: ClientSecurity = PLAINTEXT, wait_for_ready: bool = False):
        self._channel = open_channel(address, security)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._frames = _frame_calls(self._channel)
        # wait_for_ready: a call waits (within its timeout) for a server that is not up yet,
        # e.g. one Ray is restarting, instead of failing at once.
        self._call = {"timeout": timeout, "wait_for_ready": wait_for_ready}

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def publish(self, snapshot: Snapshot) -> int:
        """Sends a snapshot in chunks, hashed as they go; returns the version the server now
        serves (once it is stored durably)."""
        return int(self._frames["Publish"](publish_frames(snapshot), **self._call).version)

    def fetch(self, version: int = 0) -> Snapshot:
        """A version (0: the one the fleet should run), hash-checked."""
        parts = self._frames["Fetch"](pb.FetchRequest(version=version), **self._call)
        return next(read_snapshots(parts))[0]

    def list(self) -> pb.ListReply:
        return self._stub.List(pb.ListRequest(), **self._call)

    def pin(self, version: int, client_id: str = "") -> pb.PinReply:
        return self._stub.Pin(pb.PinRequest(version=version, client_id=client_id), **self._call)

    def unpin(self, client_id: str = "") -> pb.PinReply:
        return self._stub.Unpin(pb.PinRequest(client_id=client_id), **self._call)

    def report(self, **status) -> pb.ReportReply:
        """A robot's status (the RobotStatus fields, policies/proto/policy.proto)."""
        return self._stub.Report(pb.RobotStatus(**status), **self._call)

    def upload_episode(self, episode: Episode, payload: bytes | None = None) -> pb.UploadReply:
        """Uploads one finished episode (idempotent by its episode_id)."""
        payload = episode_bytes(episode) if payload is None else payload
        return self.upload_payload(episode.lineage.episode_id, episode.lineage.actor_id, payload)

    def upload_payload(self, episode_id: str, robot_id: str, payload: bytes) -> pb.UploadReply:
        """Uploads an episode already encoded as the archive's Parquet file."""
        chunks = episode_chunks(episode_id, robot_id, payload)
        return self._stub.UploadEpisode(chunks, **self._call)

    def act(self, observation: np.ndarray, task_id: int = 0, pixels: np.ndarray | None = None,
            greedy: bool = True, client_id: str = "") -> tuple[np.ndarray, int]:
        """Remote inference: (action (A,) float32, policy version)."""
        request = pb.ActRequest(observation=np.asarray(observation, np.float32).tolist(),
                                task_id=task_id, greedy=greedy, client_id=client_id,
                                pixels=b"" if pixels is None else pixels.tobytes())
        reply = self._stub.Act(request, **self._call)
        return np.asarray(reply.action, np.float32), int(reply.policy_version)


def publish(address: str, snapshot: Snapshot, timeout: float = RPC_TIMEOUT_SECONDS,
            security: ClientSecurity = PLAINTEXT) -> int:
    with PolicyClient(address, timeout, security) as client:
        return client.publish(snapshot)


def fetch(address: str, version: int = 0, timeout: float = RPC_TIMEOUT_SECONDS,
          security: ClientSecurity = PLAINTEXT) -> Snapshot:
    with PolicyClient(address, timeout, security) as client:
        return client.fetch(version)


def weight_shapes(snapshot: Snapshot) -> dict[str, tuple[int, ...]]:
    """Decodes the weights (refusing non-finite values) -> {name: shape}. A received snapshot
    was checked while it arrived (`SnapshotReceiver`): `snapshot.shapes()` suffices there."""
    return {k: tuple(v.shape) for k, v in snapshot.state_dict().items()}


class PolicySubscriber:
    """Keeps the version the server says this client should run, on a background thread.

    Refuses, keeping the snapshot it had: a wrong hash or truncated stream, non-finite weights,
    weights whose names or shapes differ from the held version's, and a version that goes
    backwards unless the server marks it pinned (an operator's rollback). Reconnects with backoff,
    resuming after the version it holds. `last_contact` is when the server last spoke (a version
    or a heartbeat): robots derive staleness from it. A new version arrives while the server is
    still receiving it from the learner, into one buffer, checked as it comes; it is held only
    when the server says it is stored (else it is dropped, `dropped`).

    Usage:
        sub = PolicySubscriber(address, client_id="actor-0").start()
        snapshot = sub.latest()            # None until the first version arrives
        sub.wait_for_version(3, timeout=60)
    """

    def __init__(self, address: str, client_id: str, security: ClientSecurity = PLAINTEXT,
                 resolve: Callable[[], tuple[str, str] | None] | None = None,
                 local_read: bool = False):
        # resolve: the server's current (address, incarnation), asked after the stream breaks,
        # so a server restarted elsewhere is found again
        self._address, self._client_id, self._security = address, client_id, security
        self._resolve = resolve
        # local_read: ask for the server's weights file instead of data parts (a subscriber on
        # the server's host: no copy, the page cache is shared); off after a file it cannot use
        self.local_read = local_read
        self._cond = threading.Condition()
        self._latest: Snapshot | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self.last_contact: float = -float("inf")  # time.monotonic() of the last message
        self.received_at = 0.0  # time.time() when the latest snapshot was accepted
        self.server_version = 0  # what the server last said this client should run
        self.refused = 0  # snapshots refused
        self.dropped = 0  # publishes relayed while in flight that the server did not store
        self._buffers = SpareBuffer()  # the previous version's buffer, to fill again
        self.reconnects = 0  # streams that broke (server gone, GOAWAY, ...) and were reopened
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

    def _heartbeat(self, heartbeat: pb.Heartbeat) -> None:
        self.server_version = int(heartbeat.latest_version)

    def _accept(self, snapshot: Snapshot, header: pb.SnapshotHeader) -> None:
        self.server_version = snapshot.version
        with self._cond:
            held = self._latest.version if self._latest else 0
        reason = None
        if snapshot.version <= held and not (header.pinned and snapshot.version != held):
            reason = f"version regression v{snapshot.version} <= v{held}"
        else:
            try:
                shapes = snapshot.shapes()  # finite values were checked as the bytes arrived
                if self._shapes is not None and shapes != self._shapes:
                    changed = sorted(set(shapes.items()) ^ set(self._shapes.items()))[:3]
                    reason = f"weights differ in names or shapes from v{held}: {changed}"
            except SnapshotError as e:
                reason = str(e)
        if reason:
            self.refused += 1
            log.error("%s: refused snapshot v%d: %s", self._client_id, snapshot.version, reason)
            return
        with self._cond:
            previous = self._latest
            self._latest, self._shapes = snapshot, shapes
            self.received_at = time.time()
            self._cond.notify_all()
        if previous is not None:  # its buffer receives the version after next, if unused then
            self._buffers.give(memoryview(previous.weights).obj)

    def _stream(self) -> Iterable:
        held = self.latest()
        request = pb.SubscribeRequest(after_version=held.version if held else 0,
                                      client_id=self._client_id, local_read=self.local_read)
        # not wait_for_ready: ready_channel waited; a server gone since then breaks the stream,
        # and the next round looks its address up again
        parts = _frame_calls(self._channel)["Subscribe"](request)
        return read_snapshots(self._touching(parts), on_heartbeat=self._heartbeat,
                              on_dropped=self._dropped, allocate=self._buffers.take)

    def _dropped(self, end: pb.SnapshotEnd) -> None:
        self.dropped += 1
        log.warning("%s: the server did not store v%d, dropped it: %s", self._client_id,
                    end.version, end.reason)

    def _touching(self, chunks: Iterable[pb.SnapshotChunk]) -> Iterable[pb.SnapshotChunk]:
        """Sets `last_contact` on every message: a heartbeat, a header, and each data part (a long
        download is a live server, not a silent one)."""
        for chunk in chunks:
            self.last_contact = time.monotonic()
            yield chunk

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._channel, self._address = ready_channel(
                    self._address, self._security, self._stop, self._resolve, self._client_id)
                if self._channel is None:  # stopped
                    return
                for snapshot, header in self._stream():
                    self._accept(snapshot, header)
                    backoff = 0.1
            except LocalReadError as e:
                self.local_read = False
                log.warning("%s: cannot read the policy server's files (%s); receiving data "
                            "parts instead", self._client_id, e)
            except (WireError, SnapshotError) as e:
                self.refused += 1
                log.error("%s: refused a snapshot stream: %s", self._client_id, e)
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                self.reconnects += 1
                log.warning("%s: policy stream broke (%s); reconnecting", self._client_id,
                            e.code() if hasattr(e, "code") else e)
            except Exception:  # anything else: the thread must live on, or versions stop
                self.reconnects += 1
                log.exception("%s: policy stream failed; reconnecting", self._client_id)
            finally:
                if self._channel is not None:
                    self._channel.close()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
            found = resolved(self._resolve, self._client_id)
            if found is not None and found[0] != self._address:
                log.warning("%s: policy server moved to %s", self._client_id, found[0])
                self._address = found[0]
