"""What `report/index.html` shows, read from a run's storage (a local path or object-store URI).

`gather(run)` reads every source once and never raises for one that is absent or damaged: it
notes why in `RunData.missing`, and the page says so. The functions below it are pure: they turn
what was read into the page's series and tables.

Sources: `cycle.json` (rows and driver state), the episode archive (one row per episode, step
columns unread), `metrics/history/learner/*.jsonl` (one JSON line per window of learner
updates), `policies/v*.json` (snapshot metadata) and `quarantine/*.reason.json`.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
import yaml

from cluster.report import CycleRow, read_state
from replay.storage import Storage, join

HISTORY_DIR = "metrics/history/learner"  # the learner's history files, named by first step
LEARNER_TERMS = ("loss", "l_imp", "l_bc", "l_q", "temperature", "q_mean", "grad_norm", "entropy")


@dataclasses.dataclass(frozen=True)
class EpisodeSummary:
    """One archived episode, without its steps."""

    episode_id: str
    mode: str  # "collect" or "eval"
    cycle: int  # lineage cycle
    task: str
    actor_id: str  # "actor-<i>" or "robot-<id>"
    policy_version: int  # the version that chose every action
    length: int  # decisions (transitions)
    episode_return: float
    end_time: float  # unix seconds

    def env_steps(self, action_repeat: int) -> int:
        """Environment steps as cycle rows count them: action repeats for simulated actors,
        decisions for robots."""
        return self.length * (1 if self.actor_id.startswith("robot-") else action_repeat)


@dataclasses.dataclass
class RunData:
    """Everything the page shows; a source that could not be read is in `missing`."""

    run: str  # storage URI
    rows: list[CycleRow]
    state: dict[str, Any]  # cycle.json without its rows
    action_repeat: int
    episodes: list[EpisodeSummary]
    history: list[dict[str, Any]]  # learner windows, by learner_steps, one per step count
    history_skipped: int  # history lines that were not JSON objects with learner_steps
    snapshots: list[dict[str, Any]]  # {version, sha256, metadata, published (unix s or None)}
    quarantine: list[dict[str, Any]]  # the reason files' records
    missing: dict[str, str]  # source -> why it is not shown


@dataclasses.dataclass(frozen=True)
class Spread:
    """The returns of one task's episodes of one mode in one cycle row."""

    task: str
    mode: str
    row: int  # index into RunData.rows
    count: int
    mean: float
    low: float  # min
    q25: float
    q75: float
    high: float  # max


def gather(run: str) -> RunData:
    """Reads every source of the report from run storage; never raises for a missing one."""
    store = Storage(run)
    data = RunData(store.uri, [], {}, 1, [], [], 0, [], [], {})

    def attempt(source: str, read):
        try:
            return read()
        except Exception as e:  # any unreadable source is named on the page, none stops it
            data.missing[source] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return None

    state = attempt("cycle.json", lambda: read_state(store.uri))
    if state is not None:
        data.rows = attempt("cycle.json", lambda: [CycleRow(**r) for r in state.pop("rows")]) \
            or []
        data.state = state
    config = attempt("config.yaml", lambda: yaml.safe_load(store.get_bytes("config.yaml")))
    data.action_repeat = int(((config or {}).get("env") or {}).get("action_repeat", 1))
    if store.exists("archive"):
        data.episodes = attempt("archive", lambda: read_episodes(join(store.uri, "archive"))) or []
    else:
        data.missing["archive"] = "no archive/ folder"
    history = attempt(HISTORY_DIR, lambda: read_learner_history(store.child(HISTORY_DIR)))
    if history is not None:
        data.history, data.history_skipped = history
        if not data.history:
            data.missing[HISTORY_DIR] = "no learner history files (*.jsonl) in this run"
    data.snapshots = attempt("policies", lambda: read_snapshots(store.child("policies"))) or []
    data.quarantine = attempt("quarantine",
                              lambda: read_quarantine(store.child("quarantine"))) or []
    return data


def read_episodes(archive_uri: str) -> list[EpisodeSummary]:
    """Every archived episode's lineage, length and return (the step columns are not read)."""
    from replay.archive import EpisodeArchive  # pyarrow; only when a report is made

    table = EpisodeArchive(archive_uri).episode_table().to_pylist()
    return [EpisodeSummary(r["episode_id"], r["mode"], int(r["cycle"]), r["task"], r["actor_id"],
                           int(r["policy_version"]), int(r["length"]), float(r["return"]),
                           float(r["end_time"])) for r in table]


def read_learner_history(store: Storage) -> tuple[list[dict[str, Any]], int]:
    """(windows sorted by learner_steps, lines skipped). A step count written twice (a
    restarted learner rewrites its files) keeps the window with the later `time`."""
    by_step: dict[int, dict[str, Any]] = {}
    skipped = 0
    for name in store.list_files():
        if not name.endswith(".jsonl"):
            continue
        for line in store.get_bytes(name).decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
                step = int(record["learner_steps"])
            except (ValueError, KeyError, TypeError):
                skipped += bool(line.strip())  # a torn last line of a live file, or junk
                continue
            old = by_step.get(step)
            if old is None or float(record.get("time", 0)) >= float(old.get("time", 0)):
                by_step[step] = record
    return [by_step[s] for s in sorted(by_step)], skipped


def read_snapshots(store: Storage) -> list[dict[str, Any]]:
    """The metadata of every complete snapshot, oldest first, with `published`: the metadata
    file's modification time (unix seconds; None where storage gives none)."""
    snapshots = []
    for name in store.list_files():
        if name.startswith("v") and name.endswith(".json"):
            meta = json.loads(store.get_bytes(name))
            mtime = store.fs.get_file_info(store.path(name)).mtime_ns
            snapshots.append({**meta, "published": mtime / 1e9 if mtime else None})
    return sorted(snapshots, key=lambda m: int(m["version"]))


def read_quarantine(store: Storage) -> list[dict[str, Any]]:
    """The records of `quarantine/*.reason.json`; an unreadable one becomes a record whose
    reason says so."""
    records = []
    for name in store.list_files():
        if name.endswith(".reason.json"):
            try:
                records.append(json.loads(store.get_bytes(name)))
            except ValueError:
                records.append({"episode_id": name, "reasons": ["unreadable reason file"]})
    return records


# -- pure functions over what was read -------------------------------------------------------

def row_of(episode: EpisodeSummary, rows: Sequence[CycleRow], mode: str) -> int | None:
    """The index of the row an episode counts in, or None (after the last row).

    Cycles mode: its lineage cycle. Async mode, where an actor's cycle is its own count of
    collect calls: by version; a collected episode counts in the first row that published a
    newer version than the one that acted, an evaluation in the row of its version.
    """
    if mode != "async":
        index = [r.cycle for r in rows]
        i = bisect.bisect_left(index, episode.cycle)
        return i if i < len(rows) and rows[i].cycle == episode.cycle else None
    versions = [r.policy_version for r in rows]
    find = bisect.bisect_left if episode.mode == "eval" else bisect.bisect_right
    i = find(versions, episode.policy_version)
    return i if i < len(rows) else None


def return_spread(episodes: Sequence[EpisodeSummary], rows: Sequence[CycleRow],
                  mode: str) -> list[Spread]:
    """Mean, min, quartiles and max of the returns per (task, mode, row)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for e in episodes:
        row = row_of(e, rows, mode)
        if row is not None:
            groups.setdefault((e.task, e.mode, row), []).append(e.episode_return)
    spreads = []
    for (task, ep_mode, row), returns in sorted(groups.items()):
        a = np.asarray(returns, np.float64)
        q25, q75 = np.percentile(a, [25, 75])
        spreads.append(Spread(task, ep_mode, row, len(a), float(a.mean()), float(a.min()),
                              float(q25), float(q75), float(a.max())))
    return spreads


def cumulative_minutes(rows: Sequence[CycleRow]) -> list[float]:
    """Wall-clock minutes at the end of each row (the sum of the rows' seconds)."""
    return [float(m) / 60 for m in np.cumsum([r.seconds for r in rows])]


def env_steps_per_second(rows: Sequence[CycleRow]) -> list[float]:
    """Environment steps collected per second of each row."""
    before = [0] + [r.env_steps for r in rows[:-1]]
    return [(r.env_steps - b) / r.seconds if r.seconds > 0 else math.nan
            for r, b in zip(rows, before)]


def versions_behind(episodes: Sequence[EpisodeSummary],
                    snapshots: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Per collected episode: how many versions had been published (snapshot files' times)
    past the one that acted when the episode ended. Episodes of versions without a snapshot
    file time are left out."""
    published = sorted((s["published"], int(s["version"])) for s in snapshots
                       if s.get("published") is not None)
    times = [t for t, _ in published]
    newest = list(np.maximum.accumulate([v for _, v in published])) if published else []
    behind = {}
    for e in episodes:
        if e.mode != "collect":
            continue
        i = bisect.bisect_right(times, e.end_time)
        behind[e.episode_id] = max((int(newest[i - 1]) if i else 0) - e.policy_version, 0)
    return behind


def quarantine_counts(records: Sequence[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(reason, episodes, one full message) by the first reason's subject (the text before
    ':', as the actors count rejections), most frequent first."""
    counts: dict[str, list] = {}
    for record in records:
        reasons = record.get("reasons") or ["(no reason recorded)"]
        subject = str(reasons[0]).split(":")[0]
        entry = counts.setdefault(subject, [0, "; ".join(map(str, reasons))])
        entry[0] += 1
    return sorted(((k, n, text) for k, (n, text) in counts.items()), key=lambda t: (-t[1], t[0]))


def version_lineage(snapshots: Sequence[dict[str, Any]], episodes: Sequence[EpisodeSummary],
                    action_repeat: int) -> list[dict[str, Any]]:
    """Per published version: its metadata's origin fields, the episodes it acted in, and the
    collected data in the archive acted by earlier versions (what it could be trained on)."""
    lineage = []
    for snap in snapshots:
        version, meta = int(snap["version"]), snap.get("metadata", {})
        own = [e for e in episodes if e.policy_version == version]
        earlier = [e for e in episodes if e.mode == "collect" and e.policy_version < version]
        evals = [e.episode_return for e in own if e.mode == "eval"]
        lineage.append({
            "version": version, "cycle": meta.get("cycle"),
            "learner_step": meta.get("learner_step"),
            "parent_version": meta.get("parent_version"),
            "origin": {k: v for k, v in meta.items()
                       if k not in ("env_spec", "model_config", "cycle", "learner_step",
                                    "parent_version")},
            "sha256": str(snap.get("sha256", ""))[:12],
            "collect_episodes": sum(e.mode == "collect" for e in own),
            "eval_episodes": len(evals),
            "eval_return": float(np.mean(evals)) if evals else None,
            "earlier_episodes": len(earlier),
            "earlier_env_steps": sum(e.env_steps(action_repeat) for e in earlier),
        })
    return lineage
