"""What travels over the policy service: snapshots and episodes in chunks, pure functions.

A snapshot stream is a header (version, metadata, sha256, size) followed by data parts; the
receiver refuses a blob that is larger than announced, larger than its limit, or whose hash is
wrong, before anything is decoded. Episodes travel the same way as the Parquet bytes of the
archive's per-episode file, so the gateway stores exactly what it received.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq

from policies.proto import policy_pb2 as pb
from policies.snapshot import Snapshot, SnapshotError
from replay.archive import episode_table
from replay.ids import episode_id_problem, name_problem
from replay.spec import Episode

CHUNK_BYTES = 1 << 20  # 1 MiB data parts: far below gRPC's 4 MiB default message limit
MAX_SNAPSHOT_BYTES = 8 << 30  # refuse larger snapshots (a 1B-parameter fp32 model is ~4 GiB)
MAX_EPISODE_BYTES = 1 << 30  # refuse larger episode uploads


class WireError(ValueError):
    """A chunk stream that is malformed, oversized or fails its hash."""


class WireTooLarge(WireError):
    """A stream over a size limit (answered with RESOURCE_EXHAUSTED, not INVALID_ARGUMENT)."""


def snapshot_header(snapshot: Snapshot, pinned: bool = False) -> pb.SnapshotChunk:
    """The first part of a snapshot stream."""
    return pb.SnapshotChunk(header=pb.SnapshotHeader(
        version=snapshot.version, metadata_json=json.dumps(dict(snapshot.metadata)),
        sha256=snapshot.sha256, total_bytes=len(snapshot.weights), pinned=pinned))


def data_chunks(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.SnapshotChunk]:
    """The data parts of a snapshot stream, at most chunk_bytes each."""
    view = memoryview(blob)
    for start in range(0, len(blob), chunk_bytes):
        yield pb.SnapshotChunk(data=bytes(view[start:start + chunk_bytes]))


def snapshot_chunks(snapshot: Snapshot, pinned: bool = False,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.SnapshotChunk]:
    """A snapshot as a header then data parts of at most chunk_bytes."""
    yield snapshot_header(snapshot, pinned)
    yield from data_chunks(snapshot.weights, chunk_bytes)


def read_snapshots(chunks: Iterable[pb.SnapshotChunk], max_bytes: int = MAX_SNAPSHOT_BYTES,
                   on_heartbeat: Callable[[pb.Heartbeat], None] | None = None,
                   ) -> Iterator[tuple[Snapshot, pb.SnapshotHeader]]:
    """Reassembles (snapshot, header) pairs from a chunk stream, passing heartbeats to
    `on_heartbeat`. Raises WireError or SnapshotError on a bad snapshot."""
    header, parts, size = None, [], 0
    for chunk in chunks:
        kind = chunk.WhichOneof("part")
        if kind == "heartbeat":
            if on_heartbeat is not None:
                on_heartbeat(chunk.heartbeat)
            continue
        if kind == "header":
            if header is not None:
                raise WireError(f"snapshot v{header.version} ended after {size} of "
                                f"{header.total_bytes} bytes")
            header, parts, size = chunk.header, [], 0
            if header.total_bytes > max_bytes:
                raise WireError(f"snapshot v{header.version} is {header.total_bytes} bytes, "
                                f"over the limit of {max_bytes}")
        elif header is None:
            raise WireError("snapshot data arrived before its header")
        else:
            data = chunk.data  # each attribute read copies the bytes
            parts.append(data)
            size += len(data)
            if size > header.total_bytes:
                raise WireError(f"snapshot v{header.version} is longer than its announced "
                                f"{header.total_bytes} bytes")
        if header is not None and size == header.total_bytes:
            yield _snapshot(header, b"".join(parts)), header
            header = None
    if header is not None:
        raise WireError(f"snapshot v{header.version} ended after {size} of "
                        f"{header.total_bytes} bytes")


def _snapshot(header: pb.SnapshotHeader, blob: bytes) -> Snapshot:
    snapshot = Snapshot(int(header.version), json.loads(header.metadata_json), blob)
    snapshot.verify(header.sha256)
    return snapshot


def episode_bytes(episode: Episode) -> bytes:
    """The archive's Parquet encoding of one episode."""
    sink = io.BytesIO()
    pq.write_table(episode_table(episode), sink)
    return sink.getvalue()


def episode_chunks(episode_id: str, robot_id: str, payload: bytes,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.EpisodeChunk]:
    header = pb.EpisodeHeader(episode_id=episode_id, robot_id=robot_id,
                              sha256=hashlib.sha256(payload).hexdigest(),
                              total_bytes=len(payload))
    yield pb.EpisodeChunk(header=header)
    for start in range(0, len(payload), chunk_bytes):
        yield pb.EpisodeChunk(data=payload[start:start + chunk_bytes])


def read_episode(chunks: Iterable[pb.EpisodeChunk], decode: Callable[[str], Episode],
                 max_bytes: int = MAX_EPISODE_BYTES,
                 spool_dir: str | None = None) -> tuple[pb.EpisodeHeader, Episode]:
    """Receives one uploaded episode into a temp file in `spool_dir` (not into memory), hashing
    as it goes, then decodes it with `decode(path)` (policies/decode.py: in a process whose
    memory is capped); raises WireError when it is malformed and WireTooLarge when it is over
    `max_bytes` (checked on the header and while receiving) or `decode` finds it too large."""
    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise WireError("an episode upload must start with its header")
    header = first.header
    for problem in (episode_id_problem(header.episode_id, "header.episode_id"),
                    name_problem(header.robot_id, "header.robot_id")):
        if problem:
            raise WireError(problem)
    if header.total_bytes > max_bytes:
        raise WireTooLarge(f"episode {header.episode_id} is {header.total_bytes} bytes, over the "
                           f"limit of {max_bytes}")
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-") as spool:
        for chunk in it:
            if chunk.WhichOneof("part") != "data":
                raise WireError("an episode upload carries one header")
            data = chunk.data  # each attribute read copies the bytes
            size += len(data)
            if size > header.total_bytes:
                raise WireTooLarge(f"episode {header.episode_id} is longer than its announced "
                                   f"{header.total_bytes} bytes")
            digest.update(data)
            spool.write(data)
        if size != header.total_bytes or digest.hexdigest() != header.sha256:
            raise WireError(f"episode {header.episode_id}: payload does not match its header "
                            f"({size} of {header.total_bytes} bytes or a wrong sha256)")
        spool.flush()
        try:
            episode = decode(spool.name)
        except WireTooLarge as e:
            raise WireTooLarge(f"episode {header.episode_id}: {e}") from None
        except WireError as e:
            raise WireError(f"episode {header.episode_id}: {e}") from None
    if episode.lineage.episode_id != header.episode_id:
        raise WireError(f"episode {header.episode_id}: payload holds episode "
                        f"{episode.lineage.episode_id}")
    return header, episode


__all__ = ["SnapshotError", "WireError", "snapshot_header", "data_chunks", "snapshot_chunks",
           "read_snapshots", "episode_bytes", "episode_chunks", "read_episode", "WireTooLarge"]
