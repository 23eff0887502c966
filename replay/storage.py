"""Run storage: one URI (a local path, `file://`, `s3://`, `gs://`) behind `pyarrow.fs`.

Every durable artifact of a run (archive, quarantine, checkpoints, snapshots, replay checkpoints,
`cycle.json`, config, report, logs) is written through a `Storage` by whichever node produces it,
so no component assumes a shared filesystem. Node-local disk is scratch only (`scratch_dir`).

Writes of one object are atomic: locally a temp file is fsynced and renamed into place (and the
folder fsynced); on an object store a single put appears whole or not at all. A multi-file
artifact is complete when its marker file (written last) exists.

    storage = Storage("s3://bucket/runs/exp1")
    storage.put_bytes("cycle.json", data)
    storage.child("checkpoints").list_dirs()
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs


class StorageError(OSError):
    """Run storage cannot be reached or written; the message names the URI."""


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object-store URIs (s3://, gs://, ...), False for local paths and file://."""
    uri = str(uri)
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A local path, file:// URI or object-store URI -> (filesystem, path)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """join("s3://b/run", "archive") == "s3://b/run/archive"; local paths join as paths."""
    if "://" in uri:
        return "/".join([uri.rstrip("/"), *parts])
    return str(Path(uri, *parts))


def run_id(uri: str | os.PathLike) -> str:
    """A run's id: the last component of its storage URI or path."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def scratch_dir(uri: str, name: str) -> Path:
    """Node-local scratch for run `uri` and process `name` (logs, Reverb's local checkpoint)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]  # stable across processes
    path = Path(tempfile.gettempdir()) / "pacflow" / f"{run_id(uri) or 'run'}-{digest}" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


class Storage:
    """A folder of a run's storage. Relative names use '/', never '..'."""

    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri) if "://" in str(uri) else str(Path(uri).absolute())
        try:
            self.fs, self.root = resolve(self.uri)
        except (OSError, ValueError) as e:
            raise StorageError(f"storage {self.uri}: {e}") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> "Storage":
        return Storage(join(self.uri, name))

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"storage name {name!r} must be relative, without '..'")
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def put_bytes(self, name: str, data: bytes) -> None:
        """Writes one object atomically (temp + fsync + rename locally; one put elsewhere)."""
        with self.writer(name) as f:
            f.write(data)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        """A stream that becomes object `name` when the block ends without an exception, for
        objects written piece by piece. Locally a temp file (the stream's `name`), fsynced and
        renamed into place (the folder fsynced), removed on an exception. Elsewhere one upload,
        completed on exit; on an exception the object is deleted again (it may be visible
        meanwhile: mark multi-file artifacts complete with a marker written last)."""
        target = self.path(name)
        if not self.local:
            try:
                with self.fs.open_output_stream(target) as f:
                    yield f
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(target)
                raise
            return
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def put_file(self, local: str | Path, name: str) -> None:
        self.put_bytes(name, Path(local).read_bytes())

    def _entries(self, name: str, kind: pafs.FileType) -> list[str]:
        selector = pafs.FileSelector(self.path(name), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector)
                      if i.type == kind and not i.base_name.startswith("."))

    def list_files(self, name: str = "") -> list[str]:
        """Base names of the files directly under `name` (hidden temp files left out)."""
        return self._entries(name, pafs.FileType.File)

    def list_dirs(self, name: str = "") -> list[str]:
        """Base names of the folders directly under `name`. On an object store a folder exists
        while it holds an object."""
        return self._entries(name, pafs.FileType.Directory)

    def download_dir(self, name: str, local: str | Path) -> None:
        """Copies every object under `name/` into `local` (created)."""
        root = self.path(name)
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                target = Path(local) / info.path[len(root) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as f:
                    target.write_bytes(f.read())

    def delete_dir(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_dir(self.path(name))

    def check_writable(self) -> None:
        """Writes and deletes a probe object; raises StorageError naming the URI if it cannot."""
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.put_bytes(probe, b"pacflow")
            self.fs.delete_file(self.path(probe))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StorageError(f"storage {self.uri} is not writable: {first}") from None
