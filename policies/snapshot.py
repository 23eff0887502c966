"""Versioned policy snapshots: safetensors weights + JSON metadata + sha256.

A snapshot is encoded once per version and the same bytes go to every subscriber.
On disk: `<dir>/v<version:06d>.safetensors` and `<dir>/v<version:06d>.json` (metadata + sha256),
each written to a temp file and renamed into place.
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_snapshot(snapshot: Snapshot, directory: str | os.PathLike) -> Path:
    """Writes weights then metadata (the metadata file marks the snapshot complete)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = d / f"v{snapshot.version:06d}"
    _atomic_write(stem.with_suffix(".safetensors"), snapshot.weights)
    meta = {"version": snapshot.version, "sha256": snapshot.sha256,
            "metadata": dict(snapshot.metadata)}
    _atomic_write(stem.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    return stem.with_suffix(".json")


def snapshot_paths(directory: str | os.PathLike) -> list[Path]:
    """The metadata files of the complete snapshots in `directory`, oldest first."""
    return sorted(Path(directory).glob("v*.json"))


def read_snapshot_metadata(metadata_path: str | os.PathLike) -> dict[str, Any]:
    """{version, sha256, metadata} of a stored snapshot, without reading its weights."""
    return json.loads(Path(metadata_path).read_text())


def load_snapshot(metadata_path: str | os.PathLike) -> Snapshot:
    """Reads a snapshot written by `save_snapshot` and checks its sha256."""
    meta_path = Path(metadata_path)
    meta = json.loads(meta_path.read_text())
    snap = Snapshot(int(meta["version"]), meta["metadata"],
                    meta_path.with_suffix(".safetensors").read_bytes())
    snap.verify(meta["sha256"])
    return snap
