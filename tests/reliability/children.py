"""Processes that the reliability scenarios SIGKILL or SIGSTOP: each does one kind of durable
write in a loop and prints a line after each one completes, so a test can kill it at a step.

    python -m tests.reliability.children archive-writer ARCHIVE N
    python -m tests.reliability.children checkpoint-saver DIR N
    python -m tests.reliability.children replay-writer CHECKPOINTS ARCHIVE N
    python -m tests.reliability.children replay-server CHECKPOINTS ITEMS
"""

import dataclasses
import sys
import time
import uuid

from replay.archive import EpisodeArchive
from tests.fakes import SPEC, make_episode


def episode_id(i: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"pacflow-reliability/{i}").hex


def episodes(n: int):
    """The scenarios' episodes: the same ids in every process, lengths 20..39, collect mode."""
    out = []
    for i in range(n):
        episode = make_episode(length=20 + i % 20, seed=i)
        out.append(dataclasses.replace(episode, lineage=dataclasses.replace(
            episode.lineage, episode_id=episode_id(i))))
    return out


def archive_writer(root: str, n: int) -> None:
    archive = EpisodeArchive(root)
    for episode in episodes(n):
        archive.write(episode)
        print(f"wrote {episode.lineage.episode_id}", flush=True)


def checkpoint_saver(directory: str, n: int) -> None:
    from learners.checkpoints import save_checkpoint
    from learners.config import LearnerConfig
    from learners.learner import PACLearner
    from tests.fakes import TINY_MODEL, random_batches

    learner = PACLearner(SPEC, TINY_MODEL, LearnerConfig(batch_size=8), random_batches(8))
    for step in range(1, n + 1):
        learner.run(1)
        save_checkpoint(learner.state(), directory, step=step, cycle=step)
        print(f"saved {step}", flush=True)


def replay_writer(checkpoints: str, root: str, n: int) -> None:
    """What a run's replay process and its actors do, in one process: archive first, then
    `ReplayServer.ingest`, with a checkpoint after every third episode."""
    from replay.config import ReplayConfig
    from replay.ingest import EpisodeSink
    from replay.server import ReplayServer
    from replay.spec import Adder

    server = ReplayServer(SPEC, ReplayConfig(n_step=3), checkpoints)

    class Ingest(Adder):
        idempotent = True

        def add_episode(self, episode, priorities=None):
            return server.ingest(episode)

        def holds(self, episode_id):
            return server.holds(episode_id)

    sink = EpisodeSink(SPEC, EpisodeArchive(root), Ingest(), root + ".quarantine")
    for i, episode in enumerate(episodes(n)):
        sink.write(episode, to_replay=True)
        print(f"ingested {i}", flush=True)
        if i % 3 == 2:
            server.checkpoint()
            print(f"checkpointed {i}", flush=True)


def replay_server(checkpoints: str, items: int) -> None:
    from replay.adders import ReverbSequenceAdder
    from replay.config import ReplayConfig
    from replay.server import ReplayServer

    config = ReplayConfig(n_step=1)
    server = ReplayServer(SPEC, config, checkpoints)
    ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=items))
    print(server.address, flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"archive-writer": lambda a, n: archive_writer(a, int(n)),
     "checkpoint-saver": lambda d, n: checkpoint_saver(d, int(n)),
     "replay-writer": lambda c, a, n: replay_writer(c, a, int(n)),
     "replay-server": lambda c, n: replay_server(c, int(n))}[role](*args)
