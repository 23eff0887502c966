"""Processes that the reliability scenarios SIGKILL or SIGSTOP: each does one kind of durable
write in a loop and prints a line after each one completes, so a test can kill it at a step.

    python -m tests.reliability.children archive-writer ARCHIVE N
    python -m tests.reliability.children checkpoint-saver DIR N
    python -m tests.reliability.children replay-writer CHECKPOINTS ARCHIVE N [FAIL_AT_ITEM]
    python -m tests.reliability.children replay-server CHECKPOINTS ITEMS [starving]
    python -m tests.reliability.children replay-inserter ADDRESS
    python -m tests.reliability.children policy-server DIRECTORY HEARTBEAT_SECONDS
    python -m tests.reliability.children episode-pusher RAY_ADDRESS RUN N STEPS
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


def replay_writer(checkpoints: str, root: str, n: int, fail_at: int = -1) -> None:
    """What a run's replay process and its actors do, in one process: archive first, then
    `ReplayServer.ingest`, with a checkpoint after every third episode. With `fail_at` >= 0,
    Reverb's writer raises when it creates the item of that index (counted over the process),
    as any error inside an episode's write would."""
    import reverb

    from replay.config import ReplayConfig
    from replay.ingest import EpisodeSink
    from replay.server import ReplayServer
    from replay.spec import Adder

    if fail_at >= 0:
        # The adder calls Reverb's C++ writer (pybind) directly.
        create_item, count = reverb.pybind.TrajectoryWriter.CreateItem, [0]

        def failing(self, *args, **kwargs):
            count[0] += 1
            if count[0] == fail_at + 1:  # once: the writes after it would succeed
                raise RuntimeError(f"injected failure at item {fail_at}")
            return create_item(self, *args, **kwargs)

        reverb.pybind.TrajectoryWriter.CreateItem = failing
    server = ReplayServer(SPEC, ReplayConfig(n_step=3), checkpoints, exit_on_partial=True)

    class Ingest(Adder):
        idempotent = True

        def add_episode(self, episode, priorities=None):
            return server.ingest(episode)

        def holds(self, episode_id):
            return server.holds(episode_id)

    sink = EpisodeSink(SPEC, EpisodeArchive(root), Ingest(), root + ".quarantine")
    for i, episode in enumerate(episodes(n)):
        try:
            sink.write(episode, to_replay=True)
        except Exception as e:  # a serving process lives on, as a Ray actor after a failed call
            print(f"failed {i}: {e}", flush=True)
            continue
        print(f"ingested {i}", flush=True)
        if i % 3 == 2:
            server.checkpoint()
            print(f"checkpointed {i}", flush=True)


STARVING = dict(n_step=1, rate_limiter="sample_to_insert", samples_per_insert=4.0,
                error_buffer=40.0, stall_timeout_seconds=2.0)  # S7's table


def replay_server(checkpoints: str, items: int, starving: bool = False) -> None:
    from replay.adders import ReverbSequenceAdder
    from replay.config import RateLimiter, ReplayConfig
    from replay.server import ReplayServer

    config = ReplayConfig(**{**STARVING, "rate_limiter": RateLimiter.SAMPLE_TO_INSERT}) \
        if starving else ReplayConfig(n_step=1)
    server = ReplayServer(SPEC, config, checkpoints)
    if items:
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=items))
    print(server.address, flush=True)
    while True:
        time.sleep(1)


def replay_inserter(address: str) -> None:
    """An actor that inserts a 10-step episode every 0.1 s until it is killed."""
    from replay.adders import ReverbSequenceAdder
    from replay.config import RateLimiter, ReplayConfig

    config = ReplayConfig(**{**STARVING, "rate_limiter": RateLimiter.SAMPLE_TO_INSERT})
    adder = ReverbSequenceAdder(address, config)
    for i in range(1_000_000):
        adder.add_episode(make_episode(length=10, seed=i))
        print(f"inserted {i}", flush=True)
        time.sleep(0.1)


def policy_server(directory: str, heartbeat_seconds: float) -> None:
    from policies.server import PolicyServer

    server = PolicyServer(directory, heartbeat_seconds=heartbeat_seconds)
    print(server.start(), flush=True)
    while True:
        time.sleep(1)


def episode_pusher(address: str, run: str, n: int, steps: int) -> None:
    """The run's path for episodes under object-store pressure: N camera episodes of `steps`
    steps, all put into the object store at once and sent to the run's replay process
    (ReplayWorker, as the driver starts it) as call arguments. Prints one JSON line: what
    replay holds, whether every object came back intact, and Ray's spill statistics."""
    import hashlib
    import json

    import numpy as np
    import ray
    from ray._private.internal_api import memory_summary

    from cluster.config import ClusterConfig
    from cluster.workers import ReplayWorker
    from replay.config import ReplayConfig
    from replay.dataset import ReverbBatchIterator

    ray.init(address=address, log_to_driver=False)
    spec = dataclasses.replace(SPEC, pixels_shape=(240, 320, 3))  # 230 KB per frame
    config = ReplayConfig(n_step=1, min_size_to_sample=1)
    replay = ray.remote(num_cpus=0, max_concurrency=n + 2)(ReplayWorker).remote(
        spec, config, run, ClusterConfig())
    sources = [make_episode(length=steps, seed=i, spec=spec) for i in range(n)]
    digest = [hashlib.sha256(e.pixels.tobytes()).hexdigest() for e in sources]
    frames = {hashlib.sha256(f.tobytes()).hexdigest() for e in sources for f in e.pixels[:-1]}
    refs = [ray.put(e) for e in sources]  # all at once: more than the object store holds
    del sources
    written = ray.get([replay.ingest.remote(ref) for ref in refs], timeout=600)
    intact = [hashlib.sha256(ray.get(ref).pixels.tobytes()).hexdigest() for ref in refs]
    batches = ReverbBatchIterator(ray.get(replay.address.remote()), config, batch_size=64)
    sampled = next(batches).pixels[:, 0].numpy()
    batches.close()
    print(json.dumps({
        "written": written, "items": ray.get(replay.num_items.remote()),
        "intact": intact == digest,
        "sampled_known": all(hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest()
                             in frames for f in sampled),
        "nodes_alive": [node["Alive"] for node in ray.nodes()],
        "memory": memory_summary(address, stats_only=True)}), flush=True)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"archive-writer": lambda a, n: archive_writer(a, int(n)),
     "checkpoint-saver": lambda d, n: checkpoint_saver(d, int(n)),
     "replay-writer": lambda c, a, n, f="-1": replay_writer(c, a, int(n), int(f)),
     "replay-server": lambda c, n, starving="": replay_server(c, int(n), bool(starving)),
     "replay-inserter": replay_inserter,
     "policy-server": lambda d, h: policy_server(d, float(h)),
     "episode-pusher": lambda a, r, n, t: episode_pusher(a, r, int(n), int(t))}[role](*args)
