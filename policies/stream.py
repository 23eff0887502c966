"""Snapshot streams: frames on the wire and the receiver that checks them as they arrive.

A snapshot stream is a header, data parts (consecutive slices of the safetensors blob) and an end
part (sha256, committed). Parts travel as *frames*: serialized `SnapshotChunk` messages, which the
server relays unchanged from a publisher to every subscriber, so no part is re-encoded per
subscriber. A data frame is parsed without copying its payload (`parse_frame`).

`SnapshotReceiver` takes the data parts into one preallocated buffer: it hashes them as they come,
reads the safetensors header from the first bytes and checks each tensor for NaN/Inf as soon as
its bytes are in, so little is left to do when the end part arrives, and the held snapshot's
tensors are views into that one buffer (no joined copy, no second decode).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np

from policies.proto import policy_pb2 as pb
from policies.snapshot import Snapshot, SnapshotError, TensorSlot, all_finite, \
    header_bytes_needed, slot_tensor, tensor_layout
from policies.wire import CHUNK_BYTES, MAX_SNAPSHOT_BYTES, WireError

SERVICE = "pacflow.policy.v1.PolicyService"  # policies/proto/policy.proto's package + service
# HTTP/2 flow-control window of each stream a client or the server receives, fixed (gRPC's BDP
# probing off): what one stream can have in flight while its reader is busy. 4 MiB keeps a
# 10 Gb/s link busy up to a 3 ms round trip (docs/benchmarks.md, policy push).
RECEIVE_WINDOW_BYTES = 4 << 20
DATA_TAG = b"\x12"  # SnapshotChunk field 2 (data), wire type 2 (length-delimited)
Frame = bytes  # one serialized SnapshotChunk
Part = pb.SnapshotChunk | memoryview  # a parsed frame: a message, or a data part's payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_frame(data: bytes | memoryview) -> Frame:
    """The frame of one data part (what `SnapshotChunk(data=data).SerializeToString()` gives,
    with one copy of `data`)."""
    return b"".join((DATA_TAG, _varint(len(data)), data))


def parse_frame(frame: Frame) -> Part:
    """A data frame's payload as a view into `frame` (no copy), any other frame parsed."""
    if frame[:1] == DATA_TAG:
        length, shift, pos = 0, 0, 1
        while pos < len(frame) and shift < 64:
            byte = frame[pos]
            length |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                if pos + length == len(frame):
                    return memoryview(frame)[pos:]
                break
    return pb.SnapshotChunk.FromString(frame)


def header_frame(version: int, metadata_json: str, total_bytes: int, sha256: str = "",
                 pinned: bool = False, local_path: str = "", local_temp_path: str = "") -> Frame:
    return pb.SnapshotChunk(header=pb.SnapshotHeader(
        version=version, metadata_json=metadata_json, sha256=sha256, total_bytes=total_bytes,
        pinned=pinned, local_path=local_path, local_temp_path=local_temp_path)
    ).SerializeToString()


def end_frame(version: int, sha256: str, committed: bool = True, reason: str = "") -> Frame:
    return pb.SnapshotChunk(end=pb.SnapshotEnd(version=version, sha256=sha256,
                                               committed=committed, reason=reason)
                            ).SerializeToString()


def heartbeat_frame(latest_version: int) -> Frame:
    return pb.SnapshotChunk(heartbeat=pb.Heartbeat(latest_version=latest_version)
                            ).SerializeToString()


def data_frames(blob: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> list[Frame]:
    """The data frames of a whole blob, at most chunk_bytes of payload each."""
    view = memoryview(blob).cast("B")
    return [data_frame(view[i:i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]


def publish_frames(snapshot: Snapshot, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Frame]:
    """What a publisher sends: the header at once (no sha256 yet), data frames hashed as they
    go, then the end part with the sha256. The first byte leaves before the blob is hashed."""
    view = memoryview(snapshot.weights).cast("B")
    yield header_frame(snapshot.version, json.dumps(dict(snapshot.metadata)), len(view))
    digest = hashlib.sha256()
    for start in range(0, len(view), chunk_bytes):
        part = view[start:start + chunk_bytes]
        digest.update(part)
        yield data_frame(part)
    yield end_frame(snapshot.version, digest.hexdigest())


def progress_frame(num_bytes: int) -> Frame:
    return pb.SnapshotChunk(progress=num_bytes).SerializeToString()


def new_buffer(num_bytes: int) -> np.ndarray:
    """A fresh receive buffer: uninitialised, so its pages are first touched as it is filled."""
    return np.empty(num_bytes, np.uint8)


class LocalReadError(WireError):
    """A local_read stream named a file this client cannot read, or one that failed its checks
    (another host's path, say): the client should receive data parts instead."""


def map_file(path: str, num_bytes: int) -> np.ndarray:
    """A file of `num_bytes`, mapped copy-on-write: its pages are the page cache's, shared with
    every process that maps it, until written (torch views need a writable buffer). Raises
    FileNotFoundError, or LocalReadError when its size differs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != num_bytes:
            raise LocalReadError(f"{path} is {os.fstat(fd).st_size} bytes, not {num_bytes}")
        return np.frombuffer(mmap.mmap(fd, num_bytes, access=mmap.ACCESS_COPY), np.uint8)
    finally:
        os.close(fd)


class SpareBuffer:
    """One receive buffer kept for the next snapshot of the same size: filling warm pages again
    costs less than first touching new ones (which the kernel zeroes)."""

    def __init__(self) -> None:
        self._spare: np.ndarray | None = None

    def give(self, buffer: object) -> None:
        """Offers a buffer that held a snapshot (kept only if it is one `new_buffer` made)."""
        if isinstance(buffer, np.ndarray) and buffer.base is None:
            self._spare = buffer

    def take(self, num_bytes: int) -> np.ndarray:
        """The spare when it has that size and nothing refers to it any more (no snapshot, no
        tensor view), else a new buffer."""
        spare, self._spare = self._spare, None
        # References to it: `spare` and getrefcount's argument, nothing else.
        if spare is not None and spare.nbytes == num_bytes and sys.getrefcount(spare) == 2:
            return spare
        return new_buffer(num_bytes)


def _map_local(header: pb.SnapshotHeader) -> np.ndarray | None:
    """The server's weights file, mapped (`map_file`); tries the temp name, then the final one
    (the file may have been renamed into place meanwhile). None when neither exists."""
    for path in (header.local_temp_path, header.local_path):
        if path:
            try:
                return map_file(path, header.total_bytes)
            except FileNotFoundError:
                continue
    return None


class SnapshotReceiver:
    """One snapshot arriving part by part, into a buffer allocated once from the header.

    Data parts are copied into the buffer (`add`). With `local` (a subscriber reading its
    server's Subscribe stream, whose header names the server's file) the file is mapped instead,
    and `advance` checks the bytes the server reports written: no copy at all, the pages are the
    server's page cache. The server never passes `local`: a publisher's header names no file
    the server would read.

    Usage:
        receiver = SnapshotReceiver(header)
        for part in data_parts:
            receiver.add(part)          # raises WireError / SnapshotError at the first problem
        snapshot = receiver.finish(end)
    """

    def __init__(self, header: pb.SnapshotHeader, max_bytes: int = MAX_SNAPSHOT_BYTES,
                 allocate: Callable[[int], np.ndarray] | None = None, local: bool = False):
        # allocate(n): a writable uint8 buffer of n bytes (e.g. SpareBuffer.take)
        self.header, self.size = header, 0
        if header.total_bytes > max_bytes:
            raise WireError(f"snapshot v{header.version} is {header.total_bytes} bytes, over the "
                            f"limit of {max_bytes}")
        self.local = local and bool(header.local_path)
        if self.local:
            self._buffer = _map_local(header)  # None: not on this host, or a failed publish
        else:
            self._buffer = (allocate or new_buffer)(header.total_bytes)  # touched when filled
        self._view = memoryview(self._buffer) if self._buffer is not None else None
        self._digest = hashlib.sha256()
        self._slots: list[TensorSlot] | None = None
        self._checked = 0  # slots whose bytes are all in and checked

    def add(self, data: bytes | memoryview) -> None:
        """Copies one data part in, hashes it and checks every tensor it completes."""
        end = self.size + len(data)
        if self.local or end > self.header.total_bytes:
            raise WireError(f"snapshot v{self.header.version} is longer than its announced "
                            f"{self.header.total_bytes} bytes, or a local_read stream with data")
        self._buffer[self.size:end] = np.frombuffer(data, np.uint8)
        self._check(end)

    def advance(self, num_bytes: int) -> None:
        """Local_read: the file's first `num_bytes` are written; checks those not yet seen."""
        if not self.local or num_bytes > self.header.total_bytes:
            raise WireError(f"snapshot v{self.header.version}: progress {num_bytes} past its "
                            f"{self.header.total_bytes} bytes, or without a local file")
        if self._buffer is not None and num_bytes > self.size:
            self._check(num_bytes)

    def _check(self, end: int) -> None:
        """Hashes bytes [size, end) of the buffer and checks every tensor they complete."""
        self._digest.update(self._view[self.size:end])
        self.size = end
        if self._slots is None:
            needed = header_bytes_needed(self._view[:self.size])
            if needed is None or needed > self.size:
                return
            self._slots = tensor_layout(self._view[:self.size], self.header.total_bytes)
        while self._checked < len(self._slots) and self._slots[self._checked].end <= self.size:
            slot = self._slots[self._checked]
            if not all_finite(slot_tensor(self._view, slot)):
                raise SnapshotError(f"snapshot v{self.header.version}: non-finite values in "
                                    f"{slot.name}")
            self._checked += 1

    def finish(self, end: pb.SnapshotEnd) -> Snapshot:
        """The snapshot, once every byte arrived and matches the sha256 the stream announced."""
        version = self.header.version
        if self.local:
            if self._buffer is None:
                raise LocalReadError(f"snapshot v{version}: no file {self.header.local_path} "
                                     "on this host")
            self.advance(self.header.total_bytes)  # a stored version: the whole file at once
        if self.size != self.header.total_bytes or end.version != version:
            raise WireError(f"snapshot v{version} ended after {self.size} of "
                            f"{self.header.total_bytes} bytes (end part of v{end.version})")
        if self._slots is None:
            raise SnapshotError(f"snapshot v{version}: no safetensors header")
        sha256 = self._digest.hexdigest()
        for announced in {end.sha256, self.header.sha256} - {""}:
            if announced != sha256:
                raise SnapshotError(f"snapshot v{version}: sha256 {sha256[:12]} does not match "
                                    f"the announced {announced[:12]}")
        if not end.sha256:
            raise WireError(f"snapshot v{version}: the end part carries no sha256")
        snapshot = Snapshot(int(version), json.loads(self.header.metadata_json), self._view,
                            finite_checked=True)  # _check saw every tensor
        snapshot.__dict__["sha256"] = sha256  # the cached_property, already computed
        return snapshot


def read_snapshots(parts: Iterable[Part], max_bytes: int = MAX_SNAPSHOT_BYTES,
                   on_heartbeat: Callable[[pb.Heartbeat], None] | None = None,
                   on_dropped: Callable[[pb.SnapshotEnd], None] | None = None,
                   allocate: Callable[[int], np.ndarray] | None = None,
                   ) -> Iterator[tuple[Snapshot, pb.SnapshotHeader]]:
    """(snapshot, header) for each committed snapshot in a stream of parts (`parse_frame`'s or
    messages), passing heartbeats to `on_heartbeat` and uncommitted ends (a publish the server
    did not store) to `on_dropped`; `allocate` as in SnapshotReceiver. Raises WireError or
    SnapshotError on a bad snapshot, LocalReadError for any problem with a local_read file."""
    receiver: SnapshotReceiver | None = None
    for part in parts:
        if isinstance(part, memoryview):
            kind, data = "data", part
        else:
            kind = part.WhichOneof("part")
            data = part.data if kind == "data" else b""  # each attribute read copies the bytes
        if kind == "heartbeat":
            if on_heartbeat is not None:
                on_heartbeat(part.heartbeat)
        elif kind == "header":
            if receiver is not None:
                raise WireError(f"snapshot v{receiver.header.version} ended after "
                                f"{receiver.size} of {receiver.header.total_bytes} bytes")
            receiver = SnapshotReceiver(part.header, max_bytes, allocate, local=True)
        elif receiver is None:
            raise WireError(f"snapshot {kind or 'unknown'} part arrived before its header")
        elif kind == "end" and not part.end.committed:
            if on_dropped is not None:
                on_dropped(part.end)
            receiver = None
        elif kind in ("data", "progress", "end"):
            try:
                if kind == "data":
                    receiver.add(data)
                elif kind == "progress":
                    receiver.advance(part.progress)
                else:
                    yield receiver.finish(part.end), receiver.header
                    receiver = None
            except (WireError, SnapshotError) as e:
                if receiver is not None and receiver.local and \
                        not isinstance(e, LocalReadError):
                    raise LocalReadError(str(e)) from e
                raise
        else:
            raise WireError(f"unknown snapshot part {kind!r}")
    if receiver is not None:
        raise WireError(f"snapshot v{receiver.header.version} ended after {receiver.size} of "
                        f"{receiver.header.total_bytes} bytes")


__all__ = ["SERVICE", "Frame", "data_frame", "parse_frame", "header_frame", "end_frame",
           "heartbeat_frame", "progress_frame", "data_frames", "publish_frames", "map_file",
           "SpareBuffer", "SnapshotReceiver", "LocalReadError", "read_snapshots"]
