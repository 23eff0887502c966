"""What travels over the policy service: limits, and episodes in chunks, pure functions.

Episodes travel as a header then the Parquet bytes of the archive's per-episode file, so the
gateway stores exactly what it received. Snapshot streams are in policies/stream.py.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from typing import Callable, Iterable, Iterator

import pyarrow.parquet as pq

from policies.proto import policy_pb2 as pb
from policies.snapshot import SnapshotError
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


__all__ = ["SnapshotError", "WireError", "episode_bytes", "episode_chunks", "read_episode",
           "WireTooLarge"]
