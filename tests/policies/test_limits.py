"""Gateway bounds (issue #11, items 2 and 3) against a real policy server: upload size while
receiving, uploads spooled to disk rather than memory, a server-side deadline, stream caps per
identity and in total, and a bounded catch-up for every_version subscribers."""

import dataclasses
import itertools
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from policies.certs import generate_dev_credentials
from policies.client import PolicyClient
from policies.limits import GatewayLimits
from policies.perceiver import PerceiverActorCritic
from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.security import ClientSecurity, ServerSecurity
from policies.server import PolicyServer
from policies.snapshot import Snapshot, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.ingest import EpisodeSink
from tests.fakes import SPEC, TINY_MODEL, make_episode
from tests.processes import until

MiB = 1 << 20


def _snapshot(version: int) -> Snapshot:
    torch.manual_seed(version)
    return Snapshot.from_state_dict(version, PerceiverActorCritic(SPEC, TINY_MODEL).state_dict(),
                                    snapshot_metadata(SPEC.to_dict(), TINY_MODEL, 0, 0, 0))


def _server(tmp_path, limits: GatewayLimits, security=None) -> tuple[PolicyServer, str]:
    sink = EpisodeSink(SPEC, EpisodeArchive(tmp_path / "archive"), None, tmp_path / "quarantine")
    kwargs = {} if security is None else {"security": security}
    server = PolicyServer(tmp_path / "policies", port=0, limits=limits, heartbeat_seconds=0.2,
                          episode_handler=lambda e: sink.ingest(e, to_replay=False), **kwargs)
    return server, server.start()


def _memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                if line.startswith(("VmRSS:", "VmHWM:"))}


def _serve_process(tmp_path, setting: str) -> tuple[subprocess.Popen, str]:
    """`pacflow policy serve` (smoke config, plaintext) as its own process, with one --set."""
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "policy", "serve", str(tmp_path / "run"),
         "--config", "deploy/configs/smoke.yaml", "--plaintext", "--set", setting],
        stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    assert "listening on" in line, line
    return server, line.split("listening on ")[1].split()[0]


def _upload(stub, episode_id: str, announced: int, chunks, timeout: float = 60):
    header = pb.EpisodeHeader(episode_id=episode_id, robot_id="robot-7", sha256="0" * 64,
                              total_bytes=announced)
    return stub.UploadEpisode(itertools.chain([pb.EpisodeChunk(header=header)], chunks),
                              timeout=timeout)


def test_uploads_over_the_limit_are_refused_while_receiving(tmp_path):
    server, address = _server(tmp_path, GatewayLimits(max_upload_bytes=2 * MiB))
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:  # announced too large
                _upload(stub, "a" * 32, 3 * MiB, [])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over the limit of 2097152" in err.value.details()
            part = b"x" * (512 << 10)

            def lying():  # announces 1 MiB, then sends 32 MiB
                for _ in range(64):
                    yield pb.EpisodeChunk(data=part)
            with pytest.raises(grpc.RpcError) as err:
                _upload(stub, "b" * 32, MiB, lying())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "longer than its announced" in err.value.details()
        with PolicyClient(address, timeout=10) as client:  # a normal episode still goes through
            episode = make_episode()
            good = dataclasses.replace(episode, lineage=dataclasses.replace(
                episode.lineage, actor_id="robot-7"))
            assert client.upload_episode(good).stored
    finally:
        server.stop()


def test_an_upload_is_spooled_to_disk_not_held_in_memory(tmp_path):
    """`pacflow policy serve` as its own process; its peak RSS while a 128 MiB upload arrives.
    Before, the upload arrived as a list of parts that was then joined: twice its size."""
    size, spool = 128 * MiB, tmp_path / "spool"
    spool.mkdir()
    server, address = _serve_process(tmp_path, f"gateway.spool_dir={spool}")
    try:
        block = np.random.default_rng(0).bytes(MiB)
        before = _memory(server.pid)["VmRSS"]
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:  # random bytes: refused after receiving
                _upload(pb_grpc.PolicyServiceStub(channel), "c" * 32, size,
                        (pb.EpisodeChunk(data=block) for _ in range(size // MiB)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match its header" in err.value.details()
        grew = _memory(server.pid)["VmHWM"] - before
        # ~30 MiB of gRPC buffers and first-call allocations whatever the size; joined parts
        # would be 2 x 128 MiB
        assert grew < size // 2, f"peak RSS grew {grew / MiB:.0f} MiB, upload {size // MiB} MiB"
        assert not list(spool.iterdir())  # the spool file is gone
    finally:
        server.terminate()
        server.wait(timeout=30)


def _parquet_bomb(episode, values: int) -> bytes:
    """The episode's Parquet file with its first observation replaced by `values` zeros:
    pyarrow's own dictionary and run-length encoding store it in a few hundred bytes, and the
    row group's metadata declares a `total_byte_size` of about as little."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from replay.archive import episode_table

    table = episode_table(episode)
    column = table.schema.get_field_index("observation")
    rows = table.column(column).to_pylist()
    huge = pa.array([np.zeros(values, np.float32)], type=pa.list_(pa.float32()))
    observation = pa.concat_arrays([huge, pa.array(rows[1:], type=pa.list_(pa.float32()))])
    out = io.BytesIO()
    pq.write_table(table.set_column(column, "observation", observation), out, compression="zstd")
    return out.getvalue()


def test_an_upload_that_decodes_to_much_more_than_it_stores_is_refused(tmp_path):
    """`pacflow policy serve` as its own process, `gateway.max_decoded_bytes` 16 MiB, and a
    Parquet file of a few KiB that decodes to 256 MB. Before, the gateway trusted the metadata's
    sizes and decoded it in its own memory. Now the helper process (policies/decode.py) runs
    out of its capped memory, the upload is refused, the gateway's memory does not grow, and the
    next episode goes through."""
    from actors.envs import make_env_spec

    bomb_values = 64 << 20  # 256 MB of float32
    episode = make_episode(spec=make_env_spec(["dm_control:cartpole-swingup"], action_repeat=8))
    episode = dataclasses.replace(episode, lineage=dataclasses.replace(episode.lineage,
                                                                       actor_id="robot-7"))
    bomb = _parquet_bomb(episode, bomb_values)
    assert len(bomb) < 64 << 10
    server, address = _serve_process(tmp_path, f"gateway.max_decoded_bytes={16 * MiB}")
    try:
        before = _memory(server.pid)["VmRSS"]
        with PolicyClient(address, timeout=120) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.upload_payload(episode.lineage.episode_id, "robot-7", bomb)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "more memory than the gateway allows" in err.value.details()
            grew = _memory(server.pid)["VmHWM"] - before
            assert grew < 64 * MiB, f"the gateway's peak RSS grew {grew / MiB:.0f} MiB"
            reply = client.upload_episode(episode)  # the same episode, honestly encoded
            assert reply.stored and not reply.duplicate
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_stalled_upload_is_cancelled_by_the_server_deadline(tmp_path):
    server, address = _server(tmp_path, GatewayLimits(upload_deadline_seconds=1.0))
    release = threading.Event()

    def stalled():
        yield pb.EpisodeChunk(data=b"x" * 100)
        release.wait(60)  # a client that stops sending

    try:
        with grpc.insecure_channel(address) as channel:
            header = pb.EpisodeHeader(episode_id="d" * 32, robot_id="robot-7", sha256="0" * 64,
                                      total_bytes=1000)
            call = pb_grpc.PolicyServiceStub(channel).UploadEpisode.future(
                itertools.chain([pb.EpisodeChunk(header=header)], stalled()), timeout=30)
            start = time.monotonic()
            error = call.exception(timeout=10)  # the client's own deadline is 30 s
            assert time.monotonic() - start < 10 and error is not None
            assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED), error
        until(lambda: server._servicer.slots.in_use == 0, "the upload's stream slot", 10)
    finally:
        release.set()
        server.stop()


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    directory = tmp_path_factory.mktemp("creds")
    generate_dev_credentials(directory, ["learner", "robot-1", "robot-2"])
    return directory


def _stream(stub, client_id: str = ""):
    """Opens a Subscribe stream and waits for its first message (so it holds a slot)."""
    call = stub.Subscribe(pb.SubscribeRequest(client_id=client_id), timeout=60)
    next(call)
    return call


def test_streams_are_capped_per_identity_and_in_total_and_unary_calls_keep_working(tmp_path,
                                                                                  creds):
    """Before, 64 Subscribes under one robot token took every handler thread."""
    limits = GatewayLimits(max_streams_total=3, max_streams_per_identity=2, handler_threads=8)
    server, address = _server(tmp_path, limits, ServerSecurity.from_dir(creds))
    held = []
    try:
        with PolicyClient(address, timeout=10,
                          security=ClientSecurity.from_dir(creds, "learner")) as learner:
            learner.publish(_snapshot(1))
        robot1 = PolicyClient(address, timeout=10, security=ClientSecurity.from_dir(creds,
                                                                                  "robot-1"))
        robot2 = PolicyClient(address, timeout=10, security=ClientSecurity.from_dir(creds,
                                                                                  "robot-2"))
        held += [_stream(robot1._stub), _stream(robot1._stub)]
        with pytest.raises(grpc.RpcError) as err:
            _stream(robot1._stub)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "robot-1 holds 2 streams" in err.value.details()
        held.append(_stream(robot2._stub))  # another robot still gets one
        with pytest.raises(grpc.RpcError) as err:
            _stream(robot2._stub)
        assert "the server holds 3 streams" in err.value.details()
        assert robot1.act(np.zeros(SPEC.obs_dim))[1] == 1  # unary calls are not starved
        held.pop().cancel()
        until(lambda: server._servicer.slots.in_use == 2, "a released stream slot", 10)
        held.append(_stream(robot2._stub))
        robot1.close()
        robot2.close()
    finally:
        for call in held:
            call.cancel()
        server.stop()


def test_a_far_behind_every_version_subscriber_gets_only_the_newest_versions(tmp_path):
    server, address = _server(tmp_path, GatewayLimits(max_backlog_versions=3))
    try:
        with PolicyClient(address, timeout=10) as client:
            for v in range(1, 9):
                client.publish(_snapshot(v))
            call = client._stub.Subscribe(pb.SubscribeRequest(after_version=0,
                                                              every_version=True), timeout=30)
            versions = []
            for chunk in call:
                if chunk.WhichOneof("part") == "header":
                    versions.append(chunk.header.version)
                if chunk.WhichOneof("part") == "heartbeat":
                    break
            call.cancel()
        assert versions == [6, 7, 8]
    finally:
        server.stop()


def test_limits_are_checked_by_name():
    with pytest.raises(ValueError, match="gateway.max_upload_bytes"):
        GatewayLimits(max_upload_bytes=0)
    with pytest.raises(ValueError, match="gateway.max_streams_total"):
        GatewayLimits(max_streams_total=64, handler_threads=64)


def test_act_waits_at_most_the_servers_deadline(tmp_path):
    """The first Act builds the policy from its snapshot (well over a millisecond): with a 1 ms
    server deadline it is answered DEADLINE_EXCEEDED although the client allows 30 s."""
    server, address = _server(tmp_path, GatewayLimits(act_deadline_seconds=0.001))
    try:
        with PolicyClient(address, timeout=30) as client:
            client.publish(_snapshot(1))
            with pytest.raises(grpc.RpcError) as err:
                client.act(np.zeros(SPEC.obs_dim))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no action within the deadline" in err.value.details()
    finally:
        server.stop()


def test_a_fetch_that_is_not_read_is_cancelled_by_the_server_deadline(tmp_path):
    """A 12 MB snapshot to a client that reads its first chunk and then stops: the server
    cancels the call at fetch_deadline_seconds and frees its stream slot."""
    server, address = _server(tmp_path, GatewayLimits(fetch_deadline_seconds=1.0))
    try:
        with PolicyClient(address, timeout=30) as client:
            client.publish(Snapshot.from_state_dict(1, {"w": torch.randn(3_000_000)}, {}))
            call = client._stub.Fetch(pb.FetchRequest(version=1), timeout=60)
            next(call)  # the header; then this client reads nothing more
            until(lambda: server._servicer.slots.in_use == 0, "the fetch's stream slot", 20)
            with pytest.raises(grpc.RpcError) as err:
                for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.CANCELLED
    finally:
        server.stop()


def _episode_file(tmp_path) -> tuple:
    """An 8-step episode and the path of its archived Parquet file."""
    episode = make_episode(length=8)
    archive = EpisodeArchive(tmp_path / "a")
    archive.write(episode)
    (path,) = archive.paths()
    return episode, path


def test_a_decoder_killed_from_outside_is_a_retry_not_a_refusal(tmp_path):
    """SIGKILL of the decoding helper (the gateway's shutdown, or the OOM killer) says nothing
    about the upload: DecoderStopped (UNAVAILABLE, which robots retry), not WireTooLarge (which
    they set aside for good). The next decode starts a new helper."""
    import os
    import signal

    from policies.decode import DecoderStopped, EpisodeDecoder

    episode, path = _episode_file(tmp_path)
    decoder = EpisodeDecoder(1 << 20).start()
    try:
        helper = decoder._proc.pid
        os.kill(helper, signal.SIGSTOP)  # mid-decode, as far as the gateway can tell
        thread, result = _decode_under_way(decoder, path)  # the helper holds the upload
        os.kill(helper, signal.SIGKILL)
        thread.join(timeout=60)
        assert isinstance(result["error"], DecoderStopped), result
        again = decoder.decode(path)
        assert again.lineage.episode_id == episode.lineage.episode_id
        assert decoder._proc.pid != helper
    finally:
        decoder.close()


def _raised(call) -> BaseException | None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 (the test inspects it)
        return e
    return None


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe `fd`."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def _decode_under_way(decoder, path: str) -> tuple[threading.Thread, dict]:
    """decoder.decode(path) in a thread (its error in result["error"]), once the path is in the
    helper's stdin: the decode holds the decoder's lock."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        error=_raised(lambda: decoder.decode(path))))
    thread.start()
    stdin = decoder._proc.stdin.fileno()
    until(lambda: _unread(stdin), "the path in the helper's stdin", timeout=30, poll=0.01)
    return thread, result


def test_a_stopped_decoder_is_killed_after_its_reply_time_and_close_does_not_wait_on_it(
        tmp_path):
    """A helper that stops answering (SIGSTOP: nothing kills it) used to hold the decode lock
    for ever, and every later upload and the server's stop with it. After reply_seconds it is
    killed: that decode fails as DecoderStopped (retried), the next starts a new helper, and
    close() of a decoder whose helper is stopped mid-decode returns."""
    import os
    import signal
    import time

    from policies.decode import DecoderStopped, EpisodeDecoder

    episode, path = _episode_file(tmp_path)
    decoder = EpisodeDecoder(1 << 20, reply_seconds=2.0).start()
    try:
        assert decoder.decode(path).lineage.episode_id == episode.lineage.episode_id
        os.kill(decoder._proc.pid, signal.SIGSTOP)  # ready, then stopped
        started = time.monotonic()
        with pytest.raises(DecoderStopped, match="signal 9"):
            decoder.decode(path)
        assert time.monotonic() - started < 30
        # a new helper: its start (seconds on a loaded machine) is not counted as reply time
        assert decoder.decode(path).lineage.episode_id == episode.lineage.episode_id
        os.kill(decoder._proc.pid, signal.SIGSTOP)  # stopped again, now under a decode
        thread, result = _decode_under_way(decoder, path)  # the decode holds the lock
        started = time.monotonic()
        decoder.close()  # waits at most reply_seconds for the lock, then kills the helper
        thread.join(timeout=30)
        assert time.monotonic() - started < 30 and not thread.is_alive()
        assert isinstance(result["error"], DecoderStopped), result
    finally:
        decoder.close()


def test_a_helper_slow_to_start_is_not_taken_for_a_stuck_decode(tmp_path):
    """The reply time counts from the helper's ready byte: a helper held before it is ready
    (a loaded machine) for longer than reply_seconds still answers the decode sent meanwhile.
    Counted from the write, it was killed and the upload answered as killed."""
    import os
    import signal
    import time

    from policies.decode import EpisodeDecoder

    episode, path = _episode_file(tmp_path)
    decoder = EpisodeDecoder(1 << 20, reply_seconds=1.0).start()
    try:
        os.kill(decoder._proc.pid, signal.SIGSTOP)  # before it imports pyarrow
        stdout = decoder._proc.stdout.fileno()
        assert _unread(stdout) == 0
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(episode=decoder.decode(path)))
        thread.start()
        time.sleep(3.0)  # held three reply times before it may start
        os.kill(decoder._proc.pid, signal.SIGCONT)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert result["episode"].lineage.episode_id == episode.lineage.episode_id, result
    finally:
        decoder.close()


def test_an_answer_that_follows_the_ready_byte_at_once_is_not_taken_for_silence(
        tmp_path, monkeypatch, caplog):
    """The ready byte is read alone off the pipe. Read through the buffered stream, it took the
    answer written right after it into Python's buffer; the wait for the answer then watched an
    empty pipe and killed a healthy helper after reply_seconds. Here the decoding thread wakes
    only once both are in the pipe (a loaded machine); the select it waits in is held for it."""
    import select

    from policies import decode

    episode, path = _episode_file(tmp_path)
    decoder = decode.EpisodeDecoder(1 << 20, reply_seconds=1.0).start()
    real = select.select

    def late(readers, *rest):
        if not decoder._ready:
            until(lambda: _unread(readers[0].fileno()) > 1, "the ready byte and the answer",
                  timeout=60, poll=0.01)
        return real(readers, *rest)

    monkeypatch.setattr(decode.select, "select", late)
    try:
        helper = decoder._proc.pid
        for _ in range(2):
            assert decoder.decode(path).lineage.episode_id == episode.lineage.episode_id
        assert decoder._proc.pid == helper and "killed" not in caplog.text, caplog.text
    finally:
        decoder.close()
