"""Checks an episode before it reaches replay or the archive; bad ones go to quarantine.

Reverb accepts NaN and, without client validation, any shape (reliability.md §1.6), so this is the
one trusted ingestion check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from replay.archive import EpisodeArchive
from replay.ids import episode_id_problem, name_problem, safe_file_stem
from replay.spec import EnvSpec, Episode
from replay.storage import Storage

MAX_EPISODE_LENGTH = 1_000_000


def episode_problems(episode: Episode, spec: EnvSpec) -> list[str]:
    """Every reason the episode cannot be trusted; empty when it is good."""
    n = episode.reward.shape[0]
    expected = {
        "observation": ((n, spec.obs_dim), np.float32),
        "action": ((n, spec.action_dim), np.float32),
        "reward": ((n,), np.float32), "discount": ((n,), np.float32),
        "policy_version": ((n,), np.int64),
    }
    if spec.pixels_shape:
        expected["pixels"] = ((n, *spec.pixels_shape), np.uint8)
    problems = [p for p in (episode_id_problem(episode.lineage.episode_id),
                            name_problem(episode.lineage.actor_id, "actor_id")) if p]
    if not (spec.pixels_shape or episode.pixels is None):
        problems.append("pixels: present, but the environment spec has no camera")
    for name, (shape, dtype) in expected.items():
        arr = getattr(episode, name)
        if arr is None:
            problems.append(f"{name}: missing")
        elif arr.dtype != dtype:
            problems.append(f"{name}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
        elif arr.shape != shape:
            problems.append(f"{name}: shape {arr.shape}, expected {shape}")
        elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
            problems.append(f"{name}: non-finite values")
    if not 1 <= episode.length <= MAX_EPISODE_LENGTH:
        problems.append(f"length {episode.length} outside [1, {MAX_EPISODE_LENGTH}]")
    if not 0 <= episode.task_id < spec.num_tasks:
        problems.append(f"task_id {episode.task_id} outside [0, {spec.num_tasks})")
    elif not problems:
        problems += task_problems(episode, spec)
    if episode.terminated == episode.truncated:
        problems.append("exactly one of terminated/truncated must be set")
    return problems


def task_problems(episode: Episode, spec: EnvSpec) -> list[str]:
    """What does not fit the episode's own task (shapes and types already checked): its name,
    zero padding past the task's observation and action sizes, the action bounds."""
    task, problems = spec.tasks[episode.task_id], []
    if episode.lineage.task != task.name:
        problems.append(f"lineage.task: {str(episode.lineage.task)[:80]!r} is not task "
                        f"{episode.task_id} of the run ({task.name})")
    if np.any(episode.observation[:, task.obs_dim:]):
        problems.append(f"observation: nonzero values past the {task.obs_dim} of {task.name}")
    if np.any(episode.action[:, task.action_dim:]):
        problems.append(f"action: nonzero values past the {task.action_dim} of {task.name}")
    if np.any(episode.action < spec.action_min) or np.any(episode.action > spec.action_max):
        problems.append(f"action: values outside [{spec.action_min}, {spec.action_max}]")
    return problems


def quarantine(episode: Episode, reasons: list[str], directory: str | Path) -> str:
    """Keeps a rejected episode (when Parquet can hold it) and a reason file next to it, in a
    local folder or run storage URI; returns the reason file's path. The file name comes from
    the episode id only when that is a valid id (`replay.ids.safe_file_stem`); the ids
    themselves are kept, as JSON strings, inside the reason file."""
    store = Storage(directory)
    name = f"{safe_file_stem(episode.lineage.episode_id)}.reason.json"
    record = {"episode_id": str(episode.lineage.episode_id),
              "actor_id": str(episode.lineage.actor_id), "reasons": reasons}
    store.put_bytes(name, json.dumps(record).encode())
    try:
        EpisodeArchive(store.uri).write(episode)
    except Exception as e:  # a malformed episode may not fit the schema; the reason file stays
        store.put_bytes(name, json.dumps({**record, "unstorable": str(e)}).encode())
    return store.path(name)
