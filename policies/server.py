"""The gRPC policy server and robot gateway.

The learner publishes versioned snapshots (chunked); each subscriber holds one server stream and
receives the version it should run as soon as it changes, with heartbeats while nothing changes,
so clients can tell a quiet server from an unreachable one. Operators pin a version for the fleet
or one client (rollback). Robots upload finished episodes (chunked, idempotent by episode_id),
which go through the same validation, archive and replay path as simulated ones, and thin clients
call Act, batched across callers. Versions and pins live under the run's `policies/` folder, so a
restarted server serves what it had.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry

from policies.gateway import ActBatcher
from policies.decode import DecoderStopped, EpisodeDecoder
from policies.limits import PERMANENT_REFUSAL, GatewayLimits, StreamSlots, cancel_after
from policies.metrics import ServerMetrics
from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.security import ServerSecurity, bound_client_id, caller_identity, \
    server_credentials, server_interceptors
from policies.snapshot import Snapshot, SnapshotError
from policies.store import PolicyStore, PublishBusy
from policies.stream import RECEIVE_WINDOW_BYTES, SERVICE, Frame, end_frame, header_frame, \
    heartbeat_frame
from policies.wire import MAX_SNAPSHOT_BYTES, WireError, WireTooLarge, read_episode
from replay.ids import InvalidIdError
from replay.ingest import Ingested
from replay.spec import Episode

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20  # per message; snapshots and episodes travel in 1 MiB chunks
HEARTBEAT_SECONDS = 1.0  # idle Subscribe streams get a heartbeat this often
# An upload waits at most this long (and 1 s less than its caller's deadline) for the upload
# before it to be stored; then UNAVAILABLE, retried: a slow replay or archive must not take
# every handler thread.
STORE_WAIT_SECONDS = 30.0
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Accept the clients' keepalive pings (reliability.md §3.4: else GOAWAY too_many_pings).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A fixed receive window per stream (as the clients'), not one BDP probing grows: what a
    # publish or an upload has in flight while its handler waits on the disk. A 128 MiB upload
    # to a server beside a disk writer: peak RSS grew 25-33 MiB (8 uploads), 23-48 with probing.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
]
EpisodeHandler = Callable[[Episode], Ingested]
StatusHandler = Callable[[dict], None]  # a robot's RobotStatus as a dict, robot_id checked
PLAINTEXT_LOOPBACK = ServerSecurity(allow_plaintext=True)  # in-process and single-node runs


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    """The service: versions, pins, subscriber streams, and the gateway's upload and Act."""

    def __init__(self, directory: str | Path, episode_handler: EpisodeHandler | None = None,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 max_snapshot_bytes: int = MAX_SNAPSHOT_BYTES,
                 limits: GatewayLimits = GatewayLimits(),
                 status_handler: StatusHandler | None = None,
                 registry: CollectorRegistry | None = None, relayed_from: str = ""):
        # relayed_from: a relay's server (policies/relay.py), whose versions and pins come from
        # that upstream server only: Publish, Pin and Unpin are refused
        self._relayed_from = relayed_from
        self.store = PolicyStore(directory)
        self.metrics = ServerMetrics(registry, latest=lambda: self.store.latest)
        self._status_handler = status_handler
        self.limits = limits
        self.slots = StreamSlots(limits.max_streams_total, limits.max_streams_per_identity)
        self._episode_handler = episode_handler
        self._upload_lock = threading.Lock()  # one writer into archive and replay at a time
        self._decoder = EpisodeDecoder(limits.max_decoded_bytes)
        if episode_handler is not None:  # a gateway: its uploads are decoded in this process
            self._decoder.start()
        self._heartbeat, self._max_snapshot_bytes = heartbeat_seconds, max_snapshot_bytes
        self._stopping = False
        self.batcher = ActBatcher(self._snapshot_for)

    def _snapshot_for(self, client_id: str) -> Snapshot | None:
        entry = self.store.get(self.store.target(client_id))
        return None if entry is None else entry[0]

    def _get(self, version: int, context: grpc.ServicerContext):
        """store.get, with a damaged stored version reported as DATA_LOSS (and logged)."""
        try:
            return self.store.get(version)
        except (SnapshotError, OSError) as e:
            log.error("stored policy v%d is unreadable: %s", version, e)
            context.abort(grpc.StatusCode.DATA_LOSS, f"stored policy v{version} is unreadable")

    def stop(self) -> None:
        with self.store.cond:
            self._stopping = True
            self.store.cond.notify_all()
        self.batcher.close()
        self._decoder.close()

    def Publish(self, request_iterator, context: grpc.ServicerContext) -> pb.PublishReply:
        """Receives raw frames (`add_policy_service`): relayed to subscribers while they arrive,
        stored, and only then committed (policies/store.py)."""
        self._writable(context)
        try:
            wait = min(context.time_remaining() or 60.0, 60.0)
            snapshot = self.store.receive(request_iterator, self._max_snapshot_bytes, wait)
        except (WireError, SnapshotError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PublishBusy as e:
            context.abort(grpc.StatusCode.ABORTED, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        log.info("published policy v%d (%d bytes)", snapshot.version, snapshot.num_bytes)
        return pb.PublishReply(version=snapshot.version)

    def Subscribe(self, request: pb.SubscribeRequest,
                  context: grpc.ServicerContext) -> Iterator[Frame]:
        client_id = _client_id(request.client_id, context)
        with self.slots.hold(context), self.metrics.subscribed():
            yield from self._subscribe(client_id, int(request.after_version),
                                       request.every_version, context,
                                       request.local_read and self.store.store.local)

    def _subscribe(self, client_id: str, held: int, every_version: bool,
                   context: grpc.ServicerContext, local: bool) -> Iterator[Frame]:
        store = self.store

        def inflight():  # a publish this client should receive while it arrives
            relay = store.inflight
            return relay if relay is not None and relay.version > held and \
                store.follows_latest(client_id) else None

        while context.is_active():
            with store.cond:
                store.cond.wait_for(
                    lambda: self._stopping or store.target(client_id) != held or inflight(),
                    timeout=self._heartbeat)
                if self._stopping:
                    return
                target = store.target(client_id)
                pinned = target != store.latest
                newer = [v for v in sorted(store.infos) if held < v <= target]
                newer = newer[-self.limits.max_backlog_versions:]  # a far-behind one skips
                versions = newer if every_version and not pinned and newer else [target]
                relay = inflight() if target == held else None
            if relay is not None:
                started = time.perf_counter()
                yield from relay.frames(context.is_active, self._heartbeat, local)
                if store.target(client_id) == relay.version:  # committed: it holds it now
                    held = relay.version
                    self.metrics.pushed(time.perf_counter() - started)
                continue
            if target == held or not target:
                yield heartbeat_frame(target)
                continue
            for version in versions:
                entry = self._get(version, context)
                if entry is not None:  # the same data frames go to every subscriber
                    started = time.perf_counter()
                    yield from _stored_frames(*entry, pinned=pinned, local_path=(
                        store.weights_path(version) if local else ""))
                    self.metrics.pushed(time.perf_counter() - started)
            held = target

    def Fetch(self, request: pb.FetchRequest,
              context: grpc.ServicerContext) -> Iterator[Frame]:
        with self.slots.hold(context), cancel_after(context, self.limits.fetch_deadline_seconds):
            version = int(request.version) or self.store.target("")
            entry = self._get(version, context)
            if entry is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no policy version {version}")
            yield from _stored_frames(*entry)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        with self.store.cond:
            infos = [info for _, info in sorted(self.store.infos.items())]
            return pb.ListReply(versions=infos, fleet_pin=self.store.fleet_pin,
                                client_pins=self.store.client_pins)

    def _writable(self, context: grpc.ServicerContext) -> None:
        if self._relayed_from:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this server relays the versions "
                          f"and pins of {self._relayed_from}: publish and pin there")

    def Pin(self, request: pb.PinRequest, context: grpc.ServicerContext) -> pb.PinReply:
        self._writable(context)
        _client_id(request.client_id, context)
        try:
            self.store.pin(int(request.version), request.client_id)
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        log.warning("pinned v%d for %s", request.version, request.client_id or "the fleet")
        return self.store.pins_reply()

    def Unpin(self, request: pb.PinRequest, context: grpc.ServicerContext) -> pb.PinReply:
        self._writable(context)
        _client_id(request.client_id, context)
        self.store.unpin(request.client_id)
        log.warning("unpinned %s", request.client_id or "the fleet")
        return self.store.pins_reply()

    def Report(self, request: pb.RobotStatus, context: grpc.ServicerContext) -> pb.ReportReply:
        if self._status_handler is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this policy server keeps no fleet")
        robot_id = _client_id(request.robot_id, context)  # a robot reports only as itself
        if not robot_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "robot_id: missing")
        self._status_handler({
            "robot_id": robot_id, "acting_version": request.acting_version,
            "spool_depth": request.spool_depth, "episodes": request.episodes,
            "uploaded": request.uploaded, "safe_idle_entries": request.safe_idle_entries,
            "estopped": request.estopped})
        return pb.ReportReply()

    def UploadEpisode(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadReply:
        if self._episode_handler is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this policy server has no gateway")
        result = self._upload(request_iterator, context)  # an abort raises: refused
        self.metrics.uploaded("quarantined" if result.quarantined else
                              "duplicate" if result.duplicate else "stored")
        return result

    def _upload(self, request_iterator, context: grpc.ServicerContext) -> pb.UploadReply:
        try:
            return self._receive_upload(request_iterator, context)
        except BaseException:
            self.metrics.uploaded("refused")
            raise

    def _receive_upload(self, request_iterator, context: grpc.ServicerContext
                        ) -> pb.UploadReply:
        limits = self.limits
        with self.slots.hold(context), \
                cancel_after(context, limits.upload_deadline_seconds) as expired:
            try:
                header, episode = read_episode(request_iterator, self._decoder.decode,
                                               limits.max_upload_bytes, limits.spool_dir or None)
            except WireTooLarge as e:  # the same bytes would be refused again: say so
                context.set_trailing_metadata((PERMANENT_REFUSAL,))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except DecoderStopped as e:  # not the upload's fault: the robot retries it
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except WireError as e:
                if expired.is_set():
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"upload still incomplete after {limits.upload_deadline_seconds}"
                                  " s (gateway.upload_deadline_seconds)")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        identity = caller_identity()
        if identity and header.robot_id != identity:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{identity} may not upload episodes of {header.robot_id!r}")
        if episode.lineage.actor_id != header.robot_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"episode {header.episode_id} was recorded by "
                          f"{episode.lineage.actor_id!r}, uploaded as {header.robot_id!r}")
        remaining = context.time_remaining()
        wait = STORE_WAIT_SECONDS if remaining is None else \
            max(min(remaining - 1.0, STORE_WAIT_SECONDS), 0.0)
        if not self._upload_lock.acquire(timeout=wait):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is still storing an earlier "
                          "upload (archive or replay slow); retry later")
        try:
            result = self._episode_handler(episode)
        except TimeoutError as e:  # the handler's store did not answer in time: not the upload's
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self._upload_lock.release()
        return pb.UploadReply(episode_id=header.episode_id, stored=result.stored,
                              duplicate=result.duplicate, quarantined="; ".join(result.problems))

    def Act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActReply:
        with self.metrics.acting():
            return self._act(request, context)

    def _act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActReply:
        try:
            timeout = min(context.time_remaining(), self.limits.act_deadline_seconds)
            action, version = self.batcher.act(request, _client_id(request.client_id, context),
                                               timeout=timeout)
        except LookupError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no action within the deadline")
        return pb.ActReply(action=action.tolist(), policy_version=version)


def _stored_frames(snapshot: Snapshot, data: list[Frame], pinned: bool = False,
                   local_path: str = "") -> Iterator[Frame]:
    """A stored version's stream: header (with its sha256), data frames, committed end; with
    `local_path`, the header names the file and no data frames follow."""
    yield header_frame(snapshot.version, json.dumps(dict(snapshot.metadata)), snapshot.num_bytes,
                       snapshot.sha256, pinned, local_path)
    if not local_path:
        yield from data
    yield end_frame(snapshot.version, snapshot.sha256)


def add_policy_service(servicer: PolicyServicer, server: grpc.Server) -> None:
    """Registers the service. Publish, Subscribe and Fetch carry raw frames (serialized
    SnapshotChunks, policies/stream.py), so the server relays a publisher's frames to every
    subscriber without parsing or re-encoding them; the other methods use the generated code."""
    raw = grpc.method_handlers_generic_handler(SERVICE, {
        "Publish": grpc.stream_unary_rpc_method_handler(
            servicer.Publish, response_serializer=pb.PublishReply.SerializeToString),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe, request_deserializer=pb.SubscribeRequest.FromString),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch, request_deserializer=pb.FetchRequest.FromString),
    })
    server.add_generic_rpc_handlers((raw,))  # consulted first: shadows the generated three
    pb_grpc.add_PolicyServiceServicer_to_server(servicer, server)


def _client_id(requested: str, context: grpc.ServicerContext) -> str:
    """The client id the call runs as (`security.bound_client_id`); aborts the call with
    PERMISSION_DENIED when the caller may not act as `requested`, INVALID_ARGUMENT when it is
    not a valid name."""
    try:
        return bound_client_id(requested)
    except InvalidIdError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except PermissionError as e:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))


class PolicyServer:
    """A running gRPC policy server (and, with an episode handler, the robot gateway).

    Usage:
        server = PolicyServer(run_dir / "policies", host="127.0.0.1", port=0)
        address = server.start()          # "127.0.0.1:<port>"
        ...
        server.stop()
    """

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0,
                 episode_handler: EpisodeHandler | None = None,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 security: ServerSecurity = PLAINTEXT_LOOPBACK,
                 limits: GatewayLimits = GatewayLimits(),
                 status_handler: StatusHandler | None = None,
                 registry: CollectorRegistry | None = None, relayed_from: str = ""):
        self._credentials = server_credentials(security, host)  # refuses what is not allowed
        self._interceptors = server_interceptors(security)
        self._servicer = PolicyServicer(directory, episode_handler, heartbeat_seconds,
                                        limits=limits, status_handler=status_handler,
                                        registry=registry, relayed_from=relayed_from)
        self._host, self._port = host, port
        self._server: grpc.Server | None = None

    def start(self) -> str:
        threads = self._servicer.limits.handler_threads  # beyond them: RESOURCE_EXHAUSTED
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                                   options=SERVER_OPTIONS, interceptors=self._interceptors,
                                   maximum_concurrent_rpcs=threads)
        add_policy_service(self._servicer, self._server)
        bind = f"{self._host}:{self._port}"
        port = self._server.add_insecure_port(bind) if self._credentials is None else \
            self._server.add_secure_port(bind, self._credentials)
        if port == 0:
            raise RuntimeError(f"policy server could not bind {self._host}:{self._port}")
        self._server.start()
        self.address = f"{self._host}:{port}"
        log.info("policy server listening on %s", self.address)
        return self.address

    @property
    def latest_version(self) -> int:
        return self._servicer.store.latest

    @property
    def store(self) -> PolicyStore:
        return self._servicer.store

    @property
    def batcher(self) -> ActBatcher:
        return self._servicer.batcher

    def stop(self, grace_seconds: float = 1.0) -> None:
        self._servicer.stop()
        if self._server is not None:
            self._server.stop(grace_seconds).wait()
