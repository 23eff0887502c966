"""Clients of a replay server that Ray restarted (replay/reconnect.py), against real Reverb
servers in separate processes: SIGKILLed, started again on another port from their checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import reverb

from replay.adders import ReverbSequenceAdder
from replay.config import RateLimiter, ReplayConfig
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from tests.fakes import SPEC, make_episode

ROOT = Path(__file__).resolve().parents[2]
# A replay server process that announces (address, incarnation) the way a run's ReplayWorker
# does, and checkpoints on each line it reads.
SERVE = textwrap.dedent("""
    import json, os, sys, uuid
    from replay.config import ReplayConfig
    from replay.server import ReplayServer
    from tests.fakes import SPEC
    server = ReplayServer(SPEC, ReplayConfig(n_step=1), sys.argv[1])
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump([server.address, uuid.uuid4().hex], f)
    os.replace(tmp, sys.argv[2])
    print(server.address, flush=True)
    for line in sys.stdin:
        print(server.checkpoint(), flush=True)
""")


def _serve(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tmp_path / "ckpt"),
                             str(tmp_path / "replay.json")], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, proc.stdout.readline().strip()


def _items(address: str) -> int:
    return int(reverb.Client(address).server_info(timeout=10)["replay"].current_size)


def test_adder_and_sampler_find_a_restarted_server_at_its_new_address(tmp_path):
    first, address = _serve(tmp_path)
    resolve = lambda: tuple(json.loads((tmp_path / "replay.json").read_text()))  # noqa: E731
    config = ReplayConfig(n_step=1, timeout_seconds=5)
    batches = second = None
    try:
        adder = ReverbSequenceAdder(address, config, resolve)
        assert adder.add_episode(make_episode(length=6)) == 6
        batches = ReverbBatchIterator(address, config, batch_size=4, resolve=resolve)
        assert next(batches).observation.shape[0] == 4
        first.stdin.write("checkpoint\n")
        first.stdin.flush()
        first.stdout.readline()  # the checkpoint holds the first episode's 6 items
        first.send_signal(signal.SIGKILL)
        first.wait()
        second, new_address = _serve(tmp_path)
        assert new_address != address and _items(new_address) == 6
        # The writer's stream died with the first server: the call misses its deadline, the
        # adder finds the new incarnation and writes the whole episode there.
        assert adder.add_episode(make_episode(length=6)) == 6
        assert adder.num_reconnects == 1 and _items(new_address) == 12
        for _ in range(10):  # prefetched batches first, then the new server's
            next(batches)
        assert batches.num_reconnects == 1
    finally:
        if batches is not None:
            batches.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_a_live_server_that_holds_inserts_back_is_an_error_not_a_restart(tmp_path):
    """A sample_to_insert limiter that blocks the adder past its deadline: the same incarnation
    still answers, so the adder raises instead of writing the episode a second time."""
    config = ReplayConfig(n_step=1, timeout_seconds=2, rate_limiter=RateLimiter.SAMPLE_TO_INSERT,
                          samples_per_insert=1.0, min_size_to_sample=1, error_buffer=2.0,
                          max_in_flight_items=1)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    try:
        adder = ReverbSequenceAdder(server.address, config, lambda: (server.address, "only"))
        with pytest.raises(reverb.errors.DeadlineExceededError):
            adder.add_episode(make_episode(length=20))
        assert adder.num_reconnects == 0
    finally:
        server.stop()


def test_a_data_parallel_rank_samples_from_the_replay_server_its_run_announces(tmp_path):
    """A Ray Train rank (cluster.workers.reverb_batches) starts after replay moved (a retried
    data-parallel job): it samples from the address in `<run>/addresses/replay.json`, not the
    dead one it was built with (it used to fail there until the run ended)."""
    import socket

    from cluster.workers import reverb_batches
    from replay.storage import Storage

    config = ReplayConfig(n_step=1, timeout_seconds=10)
    server = ReplayServer(SPEC, config, tmp_path / "ckpt")
    run = str(tmp_path / "run")
    try:
        ReverbSequenceAdder(server.address, config).add_episode(make_episode(length=20))
        Storage(run).put_bytes("addresses/replay.json", json.dumps(
            {"address": server.address, "incarnation": "2"}).encode())
        with socket.socket() as s:  # the first incarnation's address: nobody there now
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        batches = reverb_batches(dead, config, 4, False, run, rank=1)
        try:
            assert next(batches).observation.shape[0] == 4
        finally:
            batches.close()
    finally:
        server.stop()
