"""Learner checkpoints: a folder per save in run storage (a local path or an object-store URI),
with a sha256 manifest written last.

    checkpoints/step_<n>/  model.safetensors  target.safetensors  optim.pt  manifest.json

Tensors go to safetensors; optimizer state goes through torch.save and is read back with
`weights_only=True`, so a checkpoint can never run pickled code. Each file is written atomically
and the manifest goes last, so a crash leaves a folder without a manifest, which loading skips:
the newest checkpoint is whole or ignored, on a local disk and on S3 alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from replay.storage import Storage, join

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is incomplete or does not match its manifest."""


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int,
                    cycle: int) -> str:
    """Writes `state` (from PACLearner.state()) as `<directory>/step_<step>`; returns its URI."""
    root = Storage(directory)
    name = f"step_{step:09d}"
    optim = io.BytesIO()
    torch.save({k: state[k] for k in ("optimizer", "dual_optimizer", "log_temperature",
                                      "log_entropy_multiplier", "num_steps", "rng_state")}, optim)
    blobs = {"model.safetensors": st_save(state["model"]),
             "target.safetensors": st_save(state["target"]), "optim.pt": optim.getvalue()}
    root.delete_dir(name)  # a rewrite of the same step must not pair new files with an old manifest
    for file, data in blobs.items():
        root.put_bytes(f"{name}/{file}", data)
    manifest = {"step": step, "cycle": cycle,
                "files": {f: hashlib.sha256(d).hexdigest() for f, d in blobs.items()}}
    root.put_bytes(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return join(root.uri, name)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint after checking every file against the manifest."""
    store, path = Storage(path), str(path)
    try:
        manifest = json.loads(store.get_bytes(MANIFEST))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    blobs = {}
    for name, digest in manifest["files"].items():
        try:
            blobs[name] = store.get_bytes(name)
        except OSError:
            blobs[name] = b""  # missing: fails the digest check below
        if hashlib.sha256(blobs[name]).hexdigest() != digest:
            raise CheckpointError(f"{path}: {name} is missing or does not match its sha256")
    try:  # weights_only: a pickled payload is refused, never executed
        optim = torch.load(io.BytesIO(blobs["optim.pt"]), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: optim.pt refused ({type(e).__name__})") from None
    return {"model": st_load(blobs["model.safetensors"]),
            "target": st_load(blobs["target.safetensors"]), **optim,
            "cycle": manifest["cycle"], "path": path}


def checkpoint_uris(directory: str | os.PathLike) -> list[str]:
    """The checkpoint folders under `directory`, oldest first (complete or not)."""
    root = Storage(directory)
    return [join(root.uri, d) for d in root.list_dirs() if d.startswith("step_")]


def load_latest_good(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The newest checkpoint under `directory` that passes its checks; None when there is none.

    A corrupt or incomplete newer checkpoint is logged and skipped, so training resumes from the
    previous one. A folder without a manifest is what a save cut short leaves (the manifest goes
    last); it is deleted, so stale partial saves do not pile up. One whose files do not match
    their manifest is kept for inspection.
    """
    root = Storage(directory)
    for uri in reversed(checkpoint_uris(directory)):
        try:
            return load_checkpoint(uri)
        except CheckpointError as e:
            log.error("skipping checkpoint: %s", e)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if not root.exists(f"{name}/{MANIFEST}"):
                root.delete_dir(name)
                log.warning("removed %s, a save that did not finish", uri)
    return None
