"""Where a run's metrics endpoints are: every process writes a Prometheus file_sd entry to
`<run>/metrics/targets/<process>.json` when it starts (cluster/process.py). Prometheus reads
those files directly when the run's storage is a local or shared folder; for object storage
(s3://...) `pacflow metrics targets RUN... --out FILE --watch 10` copies them into one local
file_sd file (docs/operations.md, "Metrics")."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from replay.storage import Storage

TARGETS = "metrics/targets"


def read_targets(run: str) -> list[dict]:
    """The run's file_sd entries, one per process (a file being rewritten is skipped)."""
    store, out = Storage(run), []
    for name in store.list_files(TARGETS):
        if name.endswith(".json"):
            try:
                out += json.loads(store.get_bytes(f"{TARGETS}/{name}"))
            except (OSError, ValueError):
                continue
    return out


def endpoints(run: str) -> dict[str, str]:
    """{process name: host:port} of the run's metrics endpoints."""
    return {e["labels"]["instance_name"]: e["targets"][0] for e in read_targets(run)}


def clear_targets(run: str) -> None:
    """Removes the run's targets (the run has ended: nothing is left to scrape)."""
    store = Storage(run)
    for name in store.list_files(TARGETS):
        store.fs.delete_file(store.path(f"{TARGETS}/{name}"))


def runs_under(root: str) -> list[str]:
    """The runs in a folder or under a URI: its subfolders that hold metrics targets."""
    store = Storage(root)
    return [f"{store.uri.rstrip('/')}/{name}" for name in store.list_dirs()
            if Storage(f"{store.uri.rstrip('/')}/{name}").exists(TARGETS)]


def write_file_sd(runs: list[str], out: str | Path) -> int:
    """Writes the targets of `runs` into one file_sd file, atomically (Prometheus never reads a
    half-written file); returns the number of targets."""
    entries = [e for run in runs for e in read_targets(run)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, out)
    return len(entries)


def watch_file_sd(runs: Callable[[], list[str]], out: str | Path, every: float,
                  rounds: int = 0) -> None:
    """write_file_sd of `runs()` every `every` seconds (`rounds` 0: until interrupted). A round
    that cannot read the storage says so on stderr and leaves the file as it was."""
    done = 0
    while True:
        try:
            write_file_sd(runs(), out)
        except OSError as e:  # storage unreachable for now: the next round tries again
            print(f"pacflow metrics targets: {e}; {out} unchanged", file=sys.stderr, flush=True)
        done += 1
        if rounds and done >= rounds:
            return
        time.sleep(every)
