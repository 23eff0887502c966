"""The one ingestion point: validate, archive (the commit log), then write to replay."""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

from replay.archive import EpisodeArchive
from replay.spec import Adder, EnvSpec, Episode
from replay.validation import episode_problems, quarantine

log = logging.getLogger(__name__)


def reason_of(problem: str) -> str:
    """The field a validation problem names ("reward: non-finite values" -> "reward",
    "length 0 outside [1, 100000]" -> "length"): a bounded metric label."""
    return problem.split(":")[0].split(" ")[0]


@dataclasses.dataclass(frozen=True)
class Ingested:
    """What happened to one episode."""

    stored: bool  # archived now (and written to replay when asked)
    duplicate: bool  # its episode_id was already archived: nothing was written again
    problems: tuple[str, ...] = ()  # why it went to quarantine; empty when it was accepted


class EpisodeSink:
    """Routes finished episodes: bad ones to quarantine, good ones to the archive and replay.

    The archive write comes first, so replay never holds an episode the archive lacks. With an
    idempotent adder (the run's replay process, `ReplayServer.ingest`), an episode that was
    archived already and that replay lacks is sent again, as the archive holds it: a write that
    failed between the archive and replay is completed by the retry; a repeat reads nothing.

    Usage:
        sink = EpisodeSink(spec, EpisodeArchive(dir), adder, run_dir / "quarantine")
        sink.write(episode, to_replay=True)   # True when accepted
    """

    def __init__(self, spec: EnvSpec, archive: EpisodeArchive, adder: Adder | None,
                 quarantine_dir: str | Path):
        self._spec, self._archive, self._adder = spec, archive, adder
        self._quarantine_dir = str(quarantine_dir)
        self.rejected: collections.Counter[str] = collections.Counter()  # by first reason
        self.num_items = 0

    def write(self, episode: Episode, to_replay: bool) -> bool:
        """True when the episode was accepted (stored now or already archived)."""
        return not self.ingest(episode, to_replay).problems

    def ingest(self, episode: Episode, to_replay: bool) -> Ingested:
        problems = episode_problems(episode, self._spec)
        if problems:
            quarantine(episode, problems, self._quarantine_dir)
            self.rejected[reason_of(problems[0])] += 1
            log.warning("quarantined episode %s: %s", episode.lineage.episode_id,
                        "; ".join(problems))
            return Ingested(False, False, tuple(problems))
        written = self._archive.write(episode)
        if to_replay and self._adder is not None:
            if written:
                self.num_items += self._adder.add_episode(episode)
            elif self._adder.idempotent and not self._adder.holds(episode.lineage.episode_id):
                archived = self._archive.read(self._archive.path_of(episode.lineage.episode_id))
                self.num_items += self._adder.add_episode(archived)
        return Ingested(written, not written)
