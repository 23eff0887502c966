"""The episode archive: one Parquet file per finished episode, written atomically.

Layout: `<root>/<episode_id>.parquet`, one row per step record (see replay/spec.py), the lineage
repeated as columns (it compresses to nothing) and also stored as JSON in the file's metadata.
Locally a write goes to `.<name>.<pid>.tmp` in the same folder, is re-read to check its row
count, then renamed into place. On an object store (s3://, gs://) it is a single put, which
appears whole or not at all. Re-archiving an episode_id that exists is a no-op.

`<root>/_manifest.json` pins the archive's schema (column names and Arrow types). Opening an
archive with a newer schema that only adds columns extends the manifest (older files read those
columns as null); a column whose type changed, or one that disappeared, is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from replay.ids import check_episode_id
from replay.spec import Episode, Lineage
from replay.storage import Storage, resolve

SCHEMA_VERSION = 2  # 2 added the nullable `pixels` column
LINEAGE_FIELDS = [
    pa.field("run_id", pa.string()), pa.field("cycle", pa.int32()),
    pa.field("actor_id", pa.string()), pa.field("task", pa.string()),
    pa.field("episode_id", pa.string()), pa.field("seed", pa.int64()),
    pa.field("mode", pa.string()), pa.field("start_time", pa.float64()),
    pa.field("end_time", pa.float64()),
]
EPISODE_FIELDS = [
    pa.field("task_id", pa.int32()), pa.field("length", pa.int32()),
    pa.field("return", pa.float32()), pa.field("terminated", pa.bool_()),
    pa.field("truncated", pa.bool_()),
]
STEP_FIELDS = [
    pa.field("step", pa.int32()), pa.field("observation", pa.list_(pa.float32())),
    pa.field("action", pa.list_(pa.float32())), pa.field("reward", pa.float32()),
    pa.field("discount", pa.float32()), pa.field("policy_version", pa.int64()),
    pa.field("is_first", pa.bool_()), pa.field("is_last", pa.bool_()),
    pa.field("pixels", pa.binary()),  # H*W*3 uint8 bytes, shape in pacflow.pixels_shape; or null
]
SCHEMA = pa.schema(LINEAGE_FIELDS + EPISODE_FIELDS + STEP_FIELDS,
                   metadata={"pacflow.schema_version": str(SCHEMA_VERSION)})


MANIFEST_NAME = "_manifest.json"


class ArchiveSchemaError(ValueError):
    """The code's schema is not an additive extension of the archive's pinned schema."""


def schema_changes(pinned: dict[str, str], current: pa.Schema) -> tuple[list[str], list[str]]:
    """(added columns, refused changes) of `current` against a pinned {name: type} schema."""
    types = {f.name: str(f.type) for f in current}
    refused = [f"column {name!r} is {old} in the archive, {types[name]} here"
               for name, old in pinned.items() if name in types and types[name] != old]
    refused += [f"column {name!r} is in the archive but not in this schema"
                for name in pinned if name not in types]
    return [name for name in types if name not in pinned], refused


def conform(table: pa.Table) -> pa.Table:
    """A table of an older (additively compatible) file -> SCHEMA, missing columns as nulls."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def episode_table(episode: Episode) -> pa.Table:
    n = episode.length + 1
    lin, const = dataclasses.asdict(episode.lineage), lambda v: [v] * n  # noqa: E731
    columns = {f.name: const(lin[f.name]) for f in LINEAGE_FIELDS}
    columns.update({
        "task_id": const(episode.task_id), "length": const(episode.length),
        "return": const(episode.episode_return), "terminated": const(episode.terminated),
        "truncated": const(episode.truncated),
        "step": np.arange(n, dtype=np.int32), "observation": list(episode.observation),
        "action": list(episode.action), "reward": episode.reward, "discount": episode.discount,
        "policy_version": episode.policy_version,
        "is_first": np.arange(n) == 0, "is_last": np.arange(n) == n - 1,
    })
    pixels = [None] * n if episode.pixels is None else [p.tobytes() for p in episode.pixels]
    columns["pixels"] = pa.array(pixels, pa.binary())
    meta = {**SCHEMA.metadata, b"pacflow.lineage": json.dumps(lin).encode()}
    if episode.pixels is not None:
        meta[b"pacflow.pixels_shape"] = json.dumps(list(episode.pixels.shape[1:])).encode()
    return pa.table(columns, schema=SCHEMA).replace_schema_metadata(meta)


class EpisodeArchive:
    """Append-only episode store.

    Usage:
        archive = EpisodeArchive(run_dir / "archive")
        archive.write(episode)                # True if written, False if it was already there
        for episode in archive.episodes(): ...
    """

    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri)
        self._store = Storage(uri)
        self._fs, self._root, self._local = self._store.fs, self._store.root, self._store.local
        self._fs.create_dir(self._root, recursive=True)
        self.schema = self._pin_schema()

    def _pin_schema(self) -> dict[str, str]:
        """Reads (or writes) the manifest; extends it by added columns; refuses other changes."""
        pinned: dict[str, str] = {}
        if self._store.exists(MANIFEST_NAME):
            pinned = json.loads(self._store.get_bytes(MANIFEST_NAME))["columns"]
        added, refused = schema_changes(pinned, SCHEMA)
        if refused:
            raise ArchiveSchemaError(f"archive {self.uri}: " + "; ".join(refused))
        if added or not pinned:
            pinned = {**pinned, **{f.name: str(f.type) for f in SCHEMA if f.name in added}}
            manifest = {"schema_version": SCHEMA_VERSION, "columns": pinned}
            self._store.put_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        return pinned

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    def path_of(self, episode_id: str) -> str:
        """The file of `episode_id`; InvalidIdError (a ValueError) for anything but 32 hex
        digits, so no id can name a path outside the archive."""
        return f"{self._root}/{check_episode_id(episode_id)}.parquet"

    def write(self, episode: Episode) -> bool:
        """Stores the episode unless its id is archived already; True when written now. The
        file is encoded in memory and checked, then stored through `Storage.put_bytes`: locally
        a hidden temp file, fsynced, renamed into place and its folder fsynced, so a crash or
        power loss leaves the whole file or none; on an object store one put."""
        target = self.path_of(episode.lineage.episode_id)
        if self._fs.get_file_info(target).type != pafs.FileType.NotFound:
            return False
        table = episode_table(episode)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue()
        if pq.read_metadata(pa.BufferReader(data)).num_rows != table.num_rows:
            raise OSError(f"archive write of {target} encoded the wrong row count")
        self._store.put_bytes(os.path.basename(target), data.to_pybytes())
        return True

    def paths(self) -> list[str]:
        selector = pafs.FileSelector(self._root, allow_not_found=True)
        return sorted(i.path for i in self._fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith("."))

    def lineage(self, path: str) -> dict:
        """The lineage of the episode in `path`, from the file's footer only."""
        meta = pq.read_metadata(path, filesystem=self._fs).metadata or {}
        return json.loads(meta[b"pacflow.lineage"])

    def read(self, path: str) -> Episode:
        return table_to_episode(pq.read_table(path, filesystem=self._fs))

    def episodes(self) -> Iterator[Episode]:
        for path in self.paths():
            yield self.read(path)

    def episode_table(self) -> pa.Table:
        """One row per episode: lineage and episode columns (the step columns are not read)."""
        columns = [f.name for f in LINEAGE_FIELDS + EPISODE_FIELDS] + ["policy_version"]
        tables = [pq.read_table(p, columns=columns, filesystem=self._fs).slice(0, 1)
                  for p in self.paths()]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)

    def export(self, destination: str | os.PathLike) -> int:
        """Writes every step row to one Parquet dataset (read back with the pinned schema by
        pandas, DuckDB, Ray Data); returns the number of episodes exported."""
        fs, root = resolve(destination)
        fs.create_dir(root, recursive=True)
        paths = self.paths()
        for i, path in enumerate(paths):  # one part per episode keeps memory flat
            table = conform(pq.read_table(path, filesystem=self._fs))
            pq.write_table(table, f"{root}/part-{i:06d}.parquet", filesystem=fs)
        return len(paths)

    def verify(self) -> tuple[int, list[tuple[str, str]]]:
        """Reads every file fully; returns (readable episode count, [(path, error)])."""
        good, bad = 0, []
        for path in self.paths():
            try:
                table = pq.read_table(path, filesystem=self._fs)
                if table.num_rows != table.column("length")[0].as_py() + 1:
                    raise ValueError("row count does not match the episode length")
                good += 1
            except Exception as e:  # any unreadable file is reported, none stops the scan
                bad.append((path, f"{type(e).__name__}: {e}".splitlines()[0]))
        return good, bad


def table_to_episode(table: pa.Table, pixels_shape: tuple[int, ...] = ()) -> Episode:
    """One episode's step rows -> Episode. The pixel shape comes from the file's metadata, or
    from `pixels_shape` where the metadata was lost (e.g. rows read through Ray Data)."""
    row0 = table.slice(0, 1).to_pylist()[0]
    lineage = Lineage(**{f.name: row0[f.name] for f in LINEAGE_FIELDS},
                      policy_version=int(table.column("policy_version")[0].as_py()))
    stack = lambda name: np.stack(table.column(name).to_numpy(zero_copy_only=False))  # noqa: E731
    return Episode(
        pixels=_pixels(table, pixels_shape),
        lineage=lineage, task_id=row0["task_id"],
        observation=stack("observation").astype(np.float32),
        action=stack("action").astype(np.float32),
        reward=table.column("reward").to_numpy().astype(np.float32),
        discount=table.column("discount").to_numpy().astype(np.float32),
        policy_version=table.column("policy_version").to_numpy().astype(np.int64),
        terminated=bool(row0["terminated"]), truncated=bool(row0["truncated"]),
    )


def episodes_from_blocks(blocks: Iterable[pa.Table],
                         pixels_shape: tuple[int, ...] = ()) -> Iterator[Episode]:
    """Step rows in archive order, in blocks of any size (e.g. from Ray Data) -> Episodes.
    An episode may span blocks; each ends at its `is_last` row."""
    pending: list[pa.Table] = []
    for block in blocks:
        ends = np.flatnonzero(block.column("is_last").to_numpy(zero_copy_only=False))
        start = 0
        for end in ends:
            pending.append(block.slice(start, end + 1 - start))
            table = pa.concat_tables(pending)
            if len(set(table.column("episode_id").to_pylist())) != 1:
                raise ValueError("archive rows arrived out of order: an episode's rows are "
                                 "interleaved with another's")
            yield table_to_episode(table, pixels_shape)
            pending, start = [], int(end) + 1
        if start < block.num_rows:
            pending.append(block.slice(start))
    if pending:
        raise ValueError("archive rows ended inside an episode (no is_last row)")


def _pixels(table: pa.Table, pixels_shape: tuple[int, ...]) -> np.ndarray | None:
    """The (T+1, H, W, 3) uint8 images of an episode table, or None (no camera, older schema)."""
    meta = (table.schema.metadata or {}).get(b"pacflow.pixels_shape")
    shape = json.loads(meta) if meta else pixels_shape
    if not shape or "pixels" not in table.column_names or table.column("pixels").null_count:
        return None
    frames = table.column("pixels").to_pylist()
    data = np.frombuffer(b"".join(frames), np.uint8)  # read-only view of the joined bytes
    return data.reshape(len(frames), *shape).copy()
