"""Reliability scenarios of `../shared/notes/reliability.md` §6 with real processes: each
writer runs as its own process (tests/reliability/children.py) and is SIGKILLed or SIGSTOPped
at a step drawn from a seeded RNG; each scenario asserts the note's pass threshold (nothing
lost, nothing duplicated, nothing partial visible) and has a hard timeout.

Here: S1/S3, S2, S6, S7, S8, S10 and S17; S18 and S19 need a Ray cluster (test_cluster.py).
Covered in other files, with real processes as well (`make test-reliability` runs them all):
S1/S8 in a whole run (tests/integration/test_async_run.py: a collector and the learner
SIGKILLed), S3/S4 in a whole run (tests/integration/test_server_restarts.py: replay SIGKILLed
while actors write), S5 (tests/replay/test_server_and_dataset.py), S9
(tests/learners/test_learner.py), S11 (tests/replay/test_archive_schema.py), S12
(tests/replay/test_validation.py), S13 (tests/integration/test_robot_cli.py,
tests/actors/test_robot.py), S14 (tests/policies/test_security.py, test_hostile_ids.py), S15
(tests/policies/test_server.py), S16 (tests/policies/test_limits.py). S7's alert and S20 need
the metrics of the observability issue.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from learners.checkpoints import checkpoint_uris, load_checkpoint, load_latest_good
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from tests.fakes import SPEC
from tests.processes import until
from tests.reliability.children import episode_id, episodes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SEEDS = [20261202, 7]


def _child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.children", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _kill_after(proc: subprocess.Popen, prefix: str, count: int) -> list[str]:
    """Reads the child's progress lines; SIGKILLs it right after the `count`-th line starting
    with `prefix` (it is then inside the next write). Returns the lines read."""
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line.strip())
        seen += line.startswith(prefix)
        if seen == count:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, lines[-5:])
    return lines


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_s10_archive_writer_killed_mid_file(tmp_path, seed):
    """Only whole, readable files in the archive's namespace; the retry archives the rest,
    each episode once."""
    n, root = 40, tmp_path / "archive"
    step = random.Random(seed).randrange(1, n - 1)
    _kill_after(_child("archive-writer", str(root), str(n)), "wrote ", step)
    archive = EpisodeArchive(root)
    good, bad = archive.verify()
    assert bad == [] and step <= good <= step + 1
    retry = _child("archive-writer", str(root), str(n))
    assert retry.wait(timeout=120) == 0
    good, bad = archive.verify()
    ids = [p.rsplit("/", 1)[-1][:-len(".parquet")] for p in archive.paths()]
    assert bad == [] and good == n and sorted(ids) == sorted(episode_id(i) for i in range(n))
    for path in archive.paths():  # and each file is the episode it names, whole
        episode = archive.read(path)
        assert path.endswith(f"{episode.lineage.episode_id}.parquet")
        assert episode.length == 20 + int(episode.lineage.seed) % 20


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_s8_learner_killed_while_saving_checkpoints(tmp_path, seed):
    """The restart loads the newest complete checkpoint, never a partial one, and removes a
    save that was cut short."""
    directory = tmp_path / "checkpoints"
    step = random.Random(seed).randrange(2, 12)
    _kill_after(_child("checkpoint-saver", str(directory), "30"), "saved ", step)
    state = load_latest_good(directory)
    assert state is not None and state["num_steps"] in (step, step + 1)
    # What is left is whole: every remaining folder loads (a cut-short save was removed).
    for uri in checkpoint_uris(directory):
        load_checkpoint(uri)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS)
def test_s1_s3_replay_writer_killed_mid_episode(tmp_path, seed):
    """The replay process SIGKILLed while it writes episodes (and checkpoints every third):
    restarted from its checkpoint and reconciled with the archive, it holds every archived
    episode whole and once, and nothing of an episode the archive lacks."""
    n, root, checkpoints = 30, tmp_path / "archive", tmp_path / "replay"
    step = random.Random(seed).randrange(4, n - 2)
    _kill_after(_child("replay-writer", str(checkpoints), str(root), str(n)), "ingested ", step)
    archive = EpisodeArchive(root)
    archived = {p.rsplit("/", 1)[-1][:-len(".parquet")] for p in archive.paths()}
    assert step <= len(archived) <= step + 1
    server = ReplayServer(SPEC, ReplayConfig(n_step=3), checkpoints)
    try:
        restored, in_checkpoint = server.num_items(), server.rate_stats()["episodes"]
        # S4's recovery point: what the checkpoint lacked is written again from the archive.
        assert server.reconcile(archive) == len(archived) - in_checkpoint
        lengths = {e.lineage.episode_id: e.length for e in episodes(n)}
        assert restored <= sum(lengths[i] for i in archived)
        assert server.num_items() == sum(lengths[i] for i in archived)
        assert server.rate_stats()["episodes"] == len(archived)
        assert all(server.holds(i) for i in archived)
        assert not any(server.holds(i) for i in set(lengths) - archived)
    finally:
        server.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_s2_exception_inside_an_episode_write(tmp_path, seed):
    """An error raised in the middle of an episode's write to replay (drawn item index): the
    replay process exits instead of keeping or checkpointing part of the episode; restarted
    from its checkpoint and reconciled, it holds every archived episode whole and once."""
    from replay.server import PARTIAL_EXIT_CODE

    n, root, checkpoints = 30, tmp_path / "archive", tmp_path / "replay"
    lengths = {e.lineage.episode_id: e.length for e in episodes(n)}
    starts = np.cumsum([0, *lengths.values()])
    fail_at = random.Random(seed).randrange(int(starts[4]), int(starts[n - 2]))
    failing = int(np.searchsorted(starts, fail_at, side="right")) - 1  # the episode cut short
    proc = _child("replay-writer", str(checkpoints), str(root), str(n), str(fail_at))
    lines = proc.communicate(timeout=240)[0].split("\n")
    archive = EpisodeArchive(root)
    archived = {p.rsplit("/", 1)[-1][:-len(".parquet")] for p in archive.paths()}
    server = ReplayServer(SPEC, ReplayConfig(n_step=3), checkpoints)
    try:  # the checkpoint holds whole episodes only, and reconciling completes the archive's
        held = [i for i in lengths if server.holds(i)]
        assert server.num_items() == sum(lengths[i] for i in held)
        assert server.reconcile(archive) == len(archived) - len(held)
        assert server.num_items() == sum(lengths[i] for i in archived)
        assert all(server.holds(i) for i in archived)
    finally:
        server.stop()
    assert proc.returncode == PARTIAL_EXIT_CODE, lines[-5:]
    assert f"ingested {failing - 1}" in lines and f"ingested {failing}" not in lines
    assert archived == set(list(lengths)[:failing + 1])  # archived first, then cut short
    assert len(held) == 3 * (failing // 3)  # the last checkpoint: every third episode


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", SEEDS[:1])
def test_s7_learner_starved_by_the_rate_limiter(tmp_path, seed):
    """Replay with a sample-to-insert rate limiter, its only inserting actor SIGKILLed at a
    drawn step: the learner's `next` waits (no error: the server answers), reports stalls
    every `stall_timeout_seconds` without spinning, and resumes when another actor inserts."""
    from replay.config import RateLimiter
    from tests.reliability.children import STARVING

    config = ReplayConfig(**{**STARVING, "rate_limiter": RateLimiter.SAMPLE_TO_INSERT})
    server = _child("replay-server", str(tmp_path / "replay"), "0", "starving")
    actors = []
    try:
        address = server.stdout.readline().strip()
        actors.append(_child("replay-inserter", address))
        batches, got, failed = ReverbBatchIterator(address, config, batch_size=4), [], []

        def learner():
            try:
                while True:
                    got.append(next(batches).reward.shape)
            except Exception as e:  # noqa: BLE001 (asserted below: none)
                failed.append(e)

        threading.Thread(target=learner, daemon=True).start()
        _kill_after(actors[0], "inserted ", random.Random(seed).randrange(3, 20))
        assert got and set(got) == {(4, 2)}
        until(lambda: batches.num_stalls >= 1, "a stall", timeout=30)
        drained, stalls = len(got), batches.num_stalls
        cpu, start = time.process_time(), time.monotonic()
        until(lambda: batches.num_stalls >= stalls + 2, "two more stalls", timeout=30)
        busy = (time.process_time() - cpu) / (time.monotonic() - start)
        assert len(got) == drained and failed == []  # starved: waiting, not failing
        print(f"starved: {busy:.1%} of a core")
        assert busy < 0.25, f"{busy:.0%} of a core while starved"
        actors.append(_child("replay-inserter", address))
        until(lambda: len(got) > drained, "batches after a new actor inserts", timeout=30)
        assert failed == []
        batches.interrupt()
    finally:
        for proc in [server, *actors]:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_s6_replay_frozen_while_the_learner_samples(tmp_path):
    """SIGSTOP the replay process: the learner's iterator does not hang; it raises within its
    timeout, naming the server. After SIGCONT the server samples again."""
    proc = _child("replay-server", str(tmp_path / "replay"), "50")
    try:
        address = proc.stdout.readline().strip()
        config = ReplayConfig(n_step=1, timeout_seconds=5)
        batches = ReverbBatchIterator(address, config, batch_size=4)
        assert next(batches).reward.shape == (4, 2)
        os.kill(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="has not answered for 5s"):
            for _ in range(10_000):  # the batches prefetched before the stop, then the error
                next(batches)
        assert time.monotonic() - start < 5 + 2 * ReverbBatchIterator.PROBE_SECONDS + 10
        batches.close()
        os.kill(proc.pid, signal.SIGCONT)
        again = ReverbBatchIterator(address, config, batch_size=4)
        assert next(again).reward.shape == (4, 2)
        again.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def idle_stream(tmp_path_factory):
    """S17's Subscribe stream, opened when this module starts, so that its 60 idle seconds
    pass while the scenarios above run (they never touch it): (server address, subscriber,
    time.monotonic() when the stream was open)."""
    from policies.client import PolicySubscriber, publish
    from tests.policies.test_limits import _snapshot

    proc = _child("policy-server", str(tmp_path_factory.mktemp("s17") / "policies"), "3600")
    subscriber = None
    try:
        address = proc.stdout.readline().strip()
        publish(address, _snapshot(1))
        subscriber = PolicySubscriber(address, "robot-0").start()
        assert subscriber.wait_for_version(1, timeout=30).version == 1  # the stream is open
        yield address, subscriber, time.monotonic()
    finally:
        if subscriber is not None:
            subscriber.close()
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_s17_an_idle_stream_keeps_its_connection(idle_stream):
    """The clients' keepalive (policies/client.py) against the server's ping policy
    (policies/server.py): a Subscribe stream with no data for 60 s (heartbeats off, the worst
    case) gets no GOAWAY too_many_pings and no reconnect, and the next version arrives on it.
    Without the server's `min_ping_interval_without_data_ms` it broke after 31 s."""
    from policies.client import publish
    from tests.policies.test_limits import _snapshot

    address, subscriber, start = idle_stream
    assert subscriber.reconnects == 0, "broke while the scenarios above ran"
    while time.monotonic() - start < 60:  # nothing travels but the client's pings
        assert subscriber.reconnects == 0, f"broke after {time.monotonic() - start:.0f} s"
        time.sleep(1)
    publish(address, _snapshot(2))
    assert subscriber.wait_for_version(2, timeout=30).version == 2
    assert subscriber.reconnects == 0
