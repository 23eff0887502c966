"""The policy server's versions, pins and the publish in flight.

A publish is received, persisted and relayed at once: each data frame is checked (hashed, copied
into the version's buffer, its completed tensors checked for NaN/Inf), written to the version's
temp file and appended to the `InFlight` that subscribers read from. Only after the end part's
sha256 matches and the weights and metadata are fsynced does the version join `infos` and the
in-flight stream end with `committed`; on any failure it ends uncommitted and nothing is stored.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator


from policies.proto import policy_pb2 as pb
from policies.snapshot import Snapshot, load_snapshot, read_snapshot_metadata, snapshot_paths, \
    metadata_name, save_snapshot, weights_name, write_snapshot_metadata
from policies.stream import Frame, SnapshotReceiver, SpareBuffer, data_frames, end_frame, \
    header_frame, map_file, parse_frame, progress_frame, publish_frames
from policies.wire import MAX_SNAPSHOT_BYTES, WireError
from replay.storage import Storage, join

log = logging.getLogger(__name__)

PINS = "pins.json"  # fleet and per-client pins, next to the versions
CACHED_VERSIONS = 3  # versions whose weights a server holds (those used last)
SYNC_EVERY_BYTES = 64 << 20  # a publish's weights are flushed to disk in the background this
#                              often, so the final fsync waits for little


class PublishBusy(RuntimeError):
    """Another publish is in progress and did not finish in time."""


class InFlight:
    """The frames of a publish being received, for subscribers to relay as they arrive.
    `local_paths`: (temp, final) names of its weights file when storage is local."""

    def __init__(self, header: pb.SnapshotHeader, local_paths: tuple[str, str] | None):
        self.version, self.header, self.local_paths = int(header.version), header, local_paths
        self.data: list[Frame] = []
        self.received = 0  # bytes received (and, locally, in the file's page cache)
        self._end: Frame | None = None
        self._cond = threading.Condition()

    def append(self, frame: Frame, num_bytes: int) -> None:
        with self._cond:
            self.data.append(frame)
            self.received += num_bytes
            self._cond.notify_all()

    def finish(self, end: Frame) -> None:
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def frames(self, is_active: Callable[[], bool], poll_seconds: float,
               local: bool = False) -> Iterator[Frame]:
        """Header, data frames as they arrive (`local` and a local file: progress frames, one
        per wake-up), then the end frame; stops early when `is_active()` turns false."""
        local = local and self.local_paths is not None
        h = self.header
        yield header_frame(h.version, h.metadata_json, h.total_bytes,
                           *(("", False, self.local_paths[1], self.local_paths[0]) if local
                             else ()))
        sent = reported = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self.data) > sent or self._end is not None,
                                    timeout=poll_seconds)
                batch, received, end = self.data[sent:], self.received, self._end
            if local:
                if received > reported:
                    yield progress_frame(received)
                    reported = received
            else:
                yield from batch
            sent += len(batch)
            if end is not None and sent == len(self.data):
                yield end
                return
            if not is_active():
                return


class PolicyStore:
    """Versions, pins and the publish in flight, behind one condition variable.

    Every version's metadata stays in memory; weights only for the newest `cached_versions`
    versions touched (with their data frames, encoded once and sent to every subscriber).
    Older ones are read back from disk, hash-checked, when asked for, so a long run of a large
    model does not hold every version it ever published.
    """

    def __init__(self, directory: str | Path, cached_versions: int = CACHED_VERSIONS):
        self.store = Storage(directory)
        self.cond = threading.Condition()
        self.infos: dict[int, pb.VersionInfo] = {}
        self.inflight: InFlight | None = None
        self._cache: collections.OrderedDict[int, tuple[Snapshot, list[Frame]]] = \
            collections.OrderedDict()
        self._cached_versions = cached_versions
        self._load_lock, self._publish_lock = threading.Lock(), threading.Lock()
        self._buffers = SpareBuffer()  # the last receive buffer, for the next publish
        for meta_path in snapshot_paths(self.store.uri):
            meta = read_snapshot_metadata(meta_path)
            size = self.store.fs.get_file_info(
                self.store.path(weights_name(int(meta["version"])))).size
            self.infos[int(meta["version"])] = _info(int(meta["version"]), meta["sha256"],
                                                     meta["metadata"], size)
        data = json.loads(self.store.get_bytes(PINS)) if self.store.exists(PINS) else {}
        self.fleet_pin: int = int(data.get("fleet", 0))
        self.client_pins: dict[str, int] = {k: int(v) for k, v in data.get("clients", {}).items()}

    @property
    def latest(self) -> int:
        return max(self.infos, default=0)

    def target(self, client_id: str) -> int:
        """The version `client_id` should run: its pin, else the fleet pin, else the latest."""
        return self.client_pins.get(client_id) or self.fleet_pin or self.latest

    def weights_path(self, version: int) -> str:
        """Where a version's weights file is (a local path when the storage is local)."""
        return self.store.path(weights_name(version))

    def follows_latest(self, client_id: str) -> bool:
        """No pin applies to `client_id`: it should receive a publish while it is in flight."""
        return not (self.client_pins.get(client_id) or self.fleet_pin)

    def get(self, version: int) -> tuple[Snapshot, list[Frame]] | None:
        """(snapshot, its data frames), or None when there is no such version. Raises
        SnapshotError or OSError when the stored version is damaged or gone."""
        with self.cond:
            if version not in self.infos:
                return None
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
        with self._load_lock:  # one disk read per version, however many callers miss
            with self.cond:
                if version in self._cache:
                    return self._cache[version]
            snapshot = load_snapshot(join(self.store.uri, metadata_name(version)))  # hash-checked
            entry = (snapshot, data_frames(snapshot.weights))  # encoded outside the lock
            with self.cond:
                evicted = self._remember(version, entry)
            self._uncache(evicted)
            return entry

    def _remember(self, version: int, entry: tuple[Snapshot, list[Frame]]) -> list[int]:
        """Caches `entry`; returns the versions it pushed out (caller: `_uncache`)."""
        self._cache[version] = entry
        evicted = []
        while len(self._cache) > self._cached_versions:
            evicted.append(self._cache.popitem(last=False)[0])
        return evicted

    def _uncache(self, versions: list[int]) -> None:
        """Drops evicted versions' weights from the page cache (local storage): a version no
        one is served from would otherwise keep its pages until memory runs short, and every
        publish would take fresh pages for its file instead of reusing these. Pages a process
        still maps (a local_read subscriber holding that version) stay."""
        if not self.store.local:
            return
        for version in versions:
            try:
                fd = os.open(self.weights_path(version), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def restore(self, snapshot: Snapshot) -> None:
        """Stores a checked snapshot older than `latest` (a relay given a pin to a version it
        no longer holds); `latest` does not change and no subscriber is sent anything."""
        save_snapshot(snapshot, self.store.uri)
        with self.cond:
            self.infos[snapshot.version] = _info(snapshot.version, snapshot.sha256,
                                                 snapshot.metadata, snapshot.num_bytes)

    def forget(self, version: int) -> None:
        """Deletes a stored version, metadata first (a relay keeps only its newest versions).
        Pages a process still maps (a local_read subscriber running it) stay valid."""
        with self.cond:
            self.infos.pop(version, None)
            self._cache.pop(version, None)
        for name in (metadata_name(version), weights_name(version)):
            try:
                self.store.fs.delete_file(self.store.path(name))
            except FileNotFoundError:
                pass

    def add(self, snapshot: Snapshot) -> None:
        """Stores a snapshot held in this process as the new latest version (as a Publish)."""
        self.receive(publish_frames(snapshot), MAX_SNAPSHOT_BYTES, wait_seconds=60.0)

    def receive(self, frames: Iterable[Frame], max_bytes: int,
                wait_seconds: float) -> Snapshot:
        """Stores a publish (header, data, end frames) as the new latest version, relaying it to
        subscribers while it arrives. Raises WireError or SnapshotError on a bad stream,
        ValueError when its version does not advance latest, PublishBusy when another publish
        holds the store for `wait_seconds`."""
        if not self._publish_lock.acquire(timeout=wait_seconds):
            raise PublishBusy(f"another publish is still in progress after {wait_seconds:.0f} s")
        try:
            it = iter(frames)
            first = parse_frame(next(it, b""))
            if isinstance(first, memoryview) or first.WhichOneof("part") != "header":
                raise WireError("a Publish call starts with its header")
            header = first.header
            if header.version <= self.latest:
                raise ValueError(f"version {header.version} does not advance latest "
                                 f"{self.latest}")
            local = self.store.local  # then: held as its file, the receive buffer reused
            receiver = SnapshotReceiver(header, max_bytes, self._buffers.take if local else None)
            name, inflight = weights_name(header.version), None
            try:
                with self.store.writer(name) as out, _WeightsFile(out, header.total_bytes,
                                                                  local) as target:
                    inflight = InFlight(pb.SnapshotHeader(
                        version=header.version, metadata_json=header.metadata_json,
                        total_bytes=header.total_bytes),
                        (out.name, self.weights_path(header.version)) if local else None)
                    with self.cond:
                        self.inflight = inflight
                        self.cond.notify_all()
                    snapshot = self._persist(it, receiver, target, inflight)
                write_snapshot_metadata(snapshot, self.store)  # marks the version complete
                if local:
                    received, snapshot = snapshot, _mapped(snapshot, self.weights_path(
                        snapshot.version))
                    self._buffers.give(received.weights.obj)
                    del received
            except BaseException as e:
                if inflight is not None:
                    with self.cond:
                        self.inflight = None
                    inflight.finish(end_frame(inflight.version, "", committed=False,
                                              reason=f"publish failed: {e}"[:500]))
                raise
            with self.cond:
                evicted = self._remember(snapshot.version, (snapshot, inflight.data))
                self.infos[snapshot.version] = _info(snapshot.version, snapshot.sha256,
                                                     snapshot.metadata, snapshot.num_bytes)
                self.inflight = None
                self.cond.notify_all()
            inflight.finish(end_frame(snapshot.version, snapshot.sha256))
            self._uncache(evicted)
            return snapshot
        finally:
            self._publish_lock.release()

    def _persist(self, frames: Iterator[Frame], receiver: SnapshotReceiver,
                 target: "_WeightsFile", inflight: InFlight) -> Snapshot:
        """Checks, writes and relays every data frame; returns the snapshot once every byte
        arrived and matches the sha256 (made durable as the file's writer closes)."""
        end = None
        for frame in frames:
            part = parse_frame(frame)
            if isinstance(part, memoryview) and end is None:
                receiver.add(part)
                target.wrote(part)
                inflight.append(frame, len(part))
            elif not isinstance(part, memoryview) and part.WhichOneof("part") == "end" \
                    and end is None:
                end = part.end
            else:
                raise WireError("a Publish call carries one header, data parts, one end part")
        if end is None:
            raise WireError(f"snapshot v{inflight.version} ended after {receiver.size} of "
                            f"{receiver.header.total_bytes} bytes, without its end part")
        return receiver.finish(end)

    def pin(self, version: int, client_id: str) -> None:
        with self.cond:
            if version not in self.infos:
                raise KeyError(f"no policy version {version} to pin")
            if client_id:
                self.client_pins[client_id] = version
            else:
                self.fleet_pin = version
            self._save_pins()

    def unpin(self, client_id: str) -> None:
        with self.cond:
            if client_id:
                self.client_pins.pop(client_id, None)
            else:
                self.fleet_pin = 0
            self._save_pins()

    def _save_pins(self) -> None:
        self.store.put_bytes(PINS, json.dumps({"fleet": self.fleet_pin,
                                               "clients": self.client_pins}).encode())
        self.cond.notify_all()

    def pins_reply(self) -> pb.PinReply:
        with self.cond:
            return pb.PinReply(fleet_pin=self.fleet_pin, client_pins=self.client_pins)


class _WeightsFile:
    """Writes a publish's weights into `out` (a `Storage.writer` stream) as they arrive. On
    local storage the file gets its full size at once (blocks reserved, so a full disk fails
    here; local_read subscribers map the whole file) and is flushed to disk in the background
    every SYNC_EVERY_BYTES, so the final fsync finds little left and the writer is never
    throttled on a mass of dirty pages."""

    def __init__(self, out: BinaryIO, size: int, local: bool):
        self._out, self._fd = out, out.fileno() if local else None
        self._pending, self._sync = 0, None
        if self._fd is not None:
            os.posix_fallocate(self._fd, 0, size)

    def __enter__(self) -> "_WeightsFile":
        return self

    def wrote(self, data: memoryview) -> None:
        self._out.write(data)
        self._pending += len(data)
        if self._fd is None or self._pending < SYNC_EVERY_BYTES or \
                (self._sync is not None and self._sync.is_alive()):
            return
        self._out.flush()
        self._pending = 0
        self._sync = threading.Thread(target=os.fdatasync, args=(self._fd,), daemon=True)
        self._sync.start()

    def __exit__(self, *exc) -> None:
        if self._sync is not None:
            self._sync.join()


def _mapped(snapshot: Snapshot, path: str) -> Snapshot:
    """The same snapshot with its weights read from its (just written) file: page cache pages,
    shared with local_read subscribers, instead of a private copy."""
    held = Snapshot(snapshot.version, snapshot.metadata,
                    memoryview(map_file(path, snapshot.num_bytes)), snapshot.finite_checked)
    held.__dict__["sha256"] = snapshot.sha256  # the same bytes, checked while received
    return held


def _info(version: int, sha256: str, metadata, size: int) -> pb.VersionInfo:
    return pb.VersionInfo(version=version, sha256=sha256, total_bytes=size,
                          metadata_json=json.dumps(dict(metadata)))
