"""Versioned policy snapshots: safetensors weights + JSON metadata + sha256.

A snapshot is encoded once per version and the same bytes go to every subscriber.
Stored (a local folder or a run storage URI): `<dir>/v<version:06d>.safetensors` and
`<dir>/v<version:06d>.json` (metadata + sha256), each written atomically, the metadata last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from replay.storage import Storage, join


class SnapshotError(ValueError):
    """A snapshot failed its integrity or compatibility checks."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    version: int  # policy version, > 0
    metadata: Mapping[str, Any]  # env_spec, model_config, cycle, learner_step, parent_version...
    weights: bytes  # safetensors-encoded state dict

    @functools.cached_property
    def sha256(self) -> str:
        """Computed once per snapshot object (the blob may be GBs)."""
        return hashlib.sha256(self.weights).hexdigest()

    @classmethod
    def from_state_dict(cls, version: int, state_dict: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, Any]) -> "Snapshot":
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        return cls(version, dict(metadata), st_save(tensors))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Decodes the weights; refuses non-finite values."""
        tensors = st_load(self.weights)
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise SnapshotError(f"snapshot v{self.version}: non-finite values in {name}")
        return tensors

    def verify(self, expected_sha256: str) -> None:
        if self.sha256 != expected_sha256:
            raise SnapshotError(f"snapshot v{self.version}: sha256 {self.sha256[:12]} does not "
                                f"match the announced {expected_sha256[:12]}")


def snapshot_metadata(env_spec: Mapping[str, Any], model_config: Any, cycle: int,
                      learner_step: int, parent_version: int, **extra: Any) -> dict[str, Any]:
    """The metadata every snapshot carries: enough to rebuild the network and trace its origin.

    Args:
        env_spec: `EnvSpec.to_dict()`.
        model_config: the PerceiverConfig (a dataclass).
        extra: e.g. `trained_on` for offline retraining.
    """
    return {"env_spec": dict(env_spec), "model_config": dataclasses.asdict(model_config),
            "cycle": cycle, "learner_step": learner_step, "parent_version": parent_version,
            **extra}


def _split(path: str | os.PathLike) -> tuple[Storage, str]:
    """`<dir>/v000003.json` -> (storage of <dir>, "v000003")."""
    uri = str(path)
    head, _, name = uri.rstrip("/").rpartition("/") if "://" in uri else \
        (str(Path(uri).absolute().parent), "/", Path(uri).name)
    return Storage(head), name.removesuffix(".json")


def save_snapshot(snapshot: Snapshot, directory: str | os.PathLike) -> str:
    """Writes weights then metadata (the metadata file marks the snapshot complete) into a local
    folder or run storage URI; returns the metadata file's path or URI."""
    store = Storage(directory)
    stem = f"v{snapshot.version:06d}"
    store.put_bytes(f"{stem}.safetensors", snapshot.weights)
    meta = {"version": snapshot.version, "sha256": snapshot.sha256,
            "metadata": dict(snapshot.metadata)}
    store.put_bytes(f"{stem}.json", json.dumps(meta, indent=1).encode())
    return join(store.uri, f"{stem}.json")


def snapshot_paths(directory: str | os.PathLike) -> list[str]:
    """The metadata files of the complete snapshots in `directory`, oldest first."""
    store = Storage(directory)
    return [join(store.uri, n) for n in store.list_files()
            if n.startswith("v") and n.endswith(".json")]


def read_snapshot_metadata(metadata_path: str | os.PathLike) -> dict[str, Any]:
    """{version, sha256, metadata} of a stored snapshot, without reading its weights."""
    store, stem = _split(metadata_path)
    return json.loads(store.get_bytes(f"{stem}.json"))


def load_snapshot(metadata_path: str | os.PathLike) -> Snapshot:
    """Reads a snapshot written by `save_snapshot` and checks its sha256."""
    store, stem = _split(metadata_path)
    meta = json.loads(store.get_bytes(f"{stem}.json"))
    snap = Snapshot(int(meta["version"]), meta["metadata"], store.get_bytes(f"{stem}.safetensors"))
    snap.verify(meta["sha256"])
    return snap
