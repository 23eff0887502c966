"""Learner checkpoints: a folder per save, written atomically, with a sha256 manifest.

    checkpoints/step_<n>/  model.safetensors  target.safetensors  optim.pt  manifest.json

Tensors go to safetensors; optimizer state goes through torch.save and is read back with
`weights_only=True`, so a checkpoint can never run pickled code. The folder is assembled under a
temporary name and renamed into place, so a crash leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is incomplete or does not match its manifest."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, cycle: int) -> Path:
    """Writes `state` (from PACLearner.state()) as `<directory>/step_<step>`; returns its path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f".step_{step:09d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(state["model"], tmp / "model.safetensors")
    save_file(state["target"], tmp / "target.safetensors")
    torch.save({k: state[k] for k in ("optimizer", "dual_optimizer", "log_temperature",
                                      "log_entropy_multiplier", "num_steps", "rng_state")},
               tmp / "optim.pt")
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "cycle": cycle,
                                                   "files": files}, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint after checking every file against the manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, digest in manifest["files"].items():
        if not (path / name).exists() or _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} is missing or does not match its sha256")
    try:  # weights_only: a pickled payload is refused, never executed
        optim = torch.load(path / "optim.pt", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: optim.pt refused ({type(e).__name__})") from None
    return {"model": load_file(path / "model.safetensors"),
            "target": load_file(path / "target.safetensors"), **optim,
            "cycle": manifest["cycle"], "path": str(path)}


def load_latest_good(directory: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint under `directory` that passes its checks; None when there is none.

    A corrupt newer checkpoint is logged and skipped, so training resumes from the previous one.
    """
    for path in sorted(Path(directory).glob("step_*"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            log.error("skipping checkpoint: %s", e)
    return None
