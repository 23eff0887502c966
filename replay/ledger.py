"""Which episodes a replay server holds, by episode id.

Replay is derived from the archive: the archive is the commit log, and every episode replay holds
is archived first. The ledger is what makes writing an episode into replay idempotent (a repeat
is a no-op) and what lets replay catch up with the archive after a failure: it is saved inside
each replay checkpoint, under the checkpoint's sha256 manifest, so a restored replay knows
exactly which whole episodes it holds (`ReplayServer.reconcile`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from replay.archive import EpisodeArchive
from replay.ids import check_episode_id

LEDGER = "pacflow_ledger.json"  # in each replay checkpoint folder: {"episodes": [ids]}


class Ledger:
    """A set of episode ids.

    Usage:
        ledger = Ledger.load(checkpoint_dir) or Ledger()
        if episode_id not in ledger: ...; ledger.add(episode_id)
    """

    def __init__(self, episode_ids: Iterable[str] = ()):
        self._ids = {check_episode_id(i) for i in episode_ids}

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, episode_id: str) -> None:
        self._ids.add(check_episode_id(episode_id))

    def to_bytes(self) -> bytes:
        return json.dumps({"episodes": sorted(self._ids)}).encode()

    @staticmethod
    def load(checkpoint: Path) -> "Ledger | None":
        """The ledger saved in a checkpoint folder; None when it has none (older pacflow)."""
        path = checkpoint / LEDGER
        if not path.exists():
            return None
        return Ledger(json.loads(path.read_text())["episodes"])


def missing_from_replay(archive: EpisodeArchive, ledger: Ledger) -> Iterator[str]:
    """Paths of archived collect episodes the ledger lacks, in archive order. Evaluation
    episodes are archived but never trained on, so they are left out (their lineage is read
    from the file's footer, not the file)."""
    for path in archive.paths():
        episode_id = path.rsplit("/", 1)[-1][:-len(".parquet")]
        if episode_id not in ledger and archive.lineage(path)["mode"] == "collect":
            yield path
