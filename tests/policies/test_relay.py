"""A publish is relayed to subscribers while the server receives it, and held only once stored."""

import mmap
import threading
from pathlib import Path

import grpc
import pytest
import torch

from policies.client import PolicyClient, PolicySubscriber, _frame_calls
from policies.proto import policy_pb2 as pb
from policies.server import PolicyServer
from policies.snapshot import Snapshot
from policies.stream import SnapshotReceiver, end_frame, publish_frames, read_snapshots
from tests.processes import until


def _snapshot(version: int) -> Snapshot:
    return Snapshot.from_state_dict(version, {"w": torch.randn(200_000), "b": torch.ones(3)},
                                    {"cycle": version})


def _next_part(stream) -> pb.SnapshotChunk | memoryview:
    """The next part that is not a heartbeat."""
    for part in stream:
        if isinstance(part, memoryview) or part.WhichOneof("part") != "heartbeat":
            return part
    raise AssertionError("the stream ended")


@pytest.fixture()
def server(tmp_path):
    srv = PolicyServer(tmp_path / "policies", port=0, heartbeat_seconds=0.2)
    address = srv.start()
    channel = grpc.insecure_channel(address)
    yield srv, address, _frame_calls(channel), tmp_path / "policies"
    channel.close()
    srv.stop()


def test_subscribers_receive_a_publish_while_it_arrives_and_it_is_committed_once_stored(server):
    srv, address, calls, folder = server
    snapshot = _snapshot(1)
    frames = list(publish_frames(snapshot, chunk_bytes=64 << 10))
    release, replies = threading.Event(), []

    def held_back():
        yield from frames[:4]  # the header and three data parts, then the publisher waits
        assert release.wait(30)
        yield from frames[4:]

    stream = calls["Subscribe"](pb.SubscribeRequest(client_id="actor-0"), timeout=30)
    publisher = threading.Thread(target=lambda: replies.append(
        calls["Publish"](held_back(), timeout=30)))
    publisher.start()
    parts = [_next_part(stream) for _ in range(4)]
    assert parts[0].header.version == 1 and parts[0].header.sha256 == ""
    assert all(isinstance(p, memoryview) for p in parts[1:])
    # Bytes reached the subscriber while the publish was incomplete: nothing is stored yet.
    with PolicyClient(address) as client:
        assert list(client.list().versions) == []
    assert not list(folder.glob("v000001*"))
    release.set()
    while not (parts and not isinstance(parts[-1], memoryview) and
               parts[-1].WhichOneof("part") == "end"):
        parts.append(_next_part(stream))
    publisher.join()
    stream.cancel()
    assert replies[0].version == 1
    end = parts[-1].end
    assert end.committed and end.sha256 == snapshot.sha256
    (received, _), = read_snapshots(parts)
    assert bytes(received.weights) == snapshot.weights
    assert {p.name for p in folder.iterdir()} == {"v000001.safetensors", "v000001.json"}
    held, _ = srv._servicer.store.get(1)  # the server holds the stored file's pages
    assert isinstance(held.weights.obj.base.obj, mmap.mmap) and held.sha256 == snapshot.sha256


def test_a_publish_that_fails_its_hash_is_dropped_by_subscribers_and_stores_nothing(server):
    srv, address, calls, folder = server
    calls["Publish"](publish_frames(_snapshot(1)), timeout=30)
    sub = PolicySubscriber(address, "actor-0").start()
    try:
        assert sub.wait_for_version(1, timeout=30).version == 1
        bad = list(publish_frames(_snapshot(2)))
        bad[-1] = end_frame(2, "0" * 64)
        with pytest.raises(grpc.RpcError) as err:
            calls["Publish"](iter(bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match the announced" in err.value.details()
        until(lambda: sub.dropped == 1, "the drop", timeout=30, poll=0.01)  # after the bytes
        assert sub.latest().version == 1 and sub.refused == 0 and srv.latest_version == 1
        assert sorted(p.name for p in folder.iterdir()) == ["v000001.json",
                                                             "v000001.safetensors"]
        good = _snapshot(2)
        calls["Publish"](publish_frames(good), timeout=30)  # the version can be published again
        assert sub.wait_for_version(2, timeout=30).sha256 == good.sha256
    finally:
        sub.close()


def test_a_publish_header_naming_a_server_file_does_not_make_the_server_read_it(server):
    """Only subscribers map files a header names: a publisher that names the stored v1 file,
    sends no data and ends with v1's sha256 is refused, and v2 is not stored."""
    srv, address, calls, folder = server
    first = _snapshot(1)
    calls["Publish"](publish_frames(first), timeout=30)
    header = pb.SnapshotHeader(version=2, metadata_json='{"cycle": 2}',
                               total_bytes=first.num_bytes,
                               local_path=str(folder / "v000001.safetensors"))
    frames = [pb.SnapshotChunk(header=header).SerializeToString(),
              end_frame(2, first.sha256)]
    with pytest.raises(grpc.RpcError) as err:
        calls["Publish"](iter(frames), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended after 0 of" in err.value.details()
    assert srv.latest_version == 1
    assert sorted(p.name for p in folder.iterdir()) == ["v000001.json", "v000001.safetensors"]


def test_a_publisher_that_disconnects_midway_leaves_nothing_behind(server):
    srv, address, calls, folder = server
    sub = PolicySubscriber(address, "actor-0").start()
    try:
        frames = list(publish_frames(_snapshot(1), chunk_bytes=64 << 10))
        with pytest.raises(grpc.RpcError):
            calls["Publish"](iter(frames[:5]), timeout=30)  # no end part: refused
        until(lambda: sub.dropped == 1, "the drop", timeout=30, poll=0.01)
        assert sub.latest() is None and srv.latest_version == 0 and not list(folder.iterdir())
    finally:
        sub.close()


def test_a_local_read_subscriber_checks_the_servers_file_as_it_is_written(server):
    _, address, calls, folder = server
    snapshot = _snapshot(1)
    frames = list(publish_frames(snapshot, chunk_bytes=64 << 10))
    release = threading.Event()

    def held_back():
        yield from frames[:4]
        assert release.wait(30)
        yield from frames[4:]

    stream = calls["Subscribe"](pb.SubscribeRequest(client_id="actor-0", local_read=True),
                                timeout=30)
    publisher = threading.Thread(target=lambda: calls["Publish"](held_back(), timeout=30))
    publisher.start()
    header = _next_part(stream).header
    assert header.local_path == str(folder / "v000001.safetensors")
    assert Path(header.local_temp_path).parent == folder and Path(header.local_temp_path).exists()
    progress = _next_part(stream)
    assert progress.WhichOneof("part") == "progress" and 0 < progress.progress <= 3 * (64 << 10)
    assert not (folder / "v000001.json").exists()  # not stored yet
    partial = SnapshotReceiver(header, local=True)  # maps the temp file the server is writing
    partial.advance(progress.progress)
    assert partial.size == progress.progress  # those bytes hashed and checked, before the rest
    release.set()
    parts = [pb.SnapshotChunk(header=header), progress]
    while parts[-1].WhichOneof("part") != "end":
        parts.append(_next_part(stream))
        assert not isinstance(parts[-1], memoryview)  # no data parts on a local_read stream
    publisher.join()
    stream.cancel()
    for part in parts[2:-1]:
        partial.advance(part.progress)
    assert partial.finish(parts[-1].end).sha256 == snapshot.sha256  # renamed: same pages
    # Read now, after the rename: the receiver finds the file under its final name.
    (received, _), = read_snapshots(parts)
    assert received.sha256 == snapshot.sha256
    assert isinstance(received.weights.obj.base.obj, mmap.mmap)  # the file's pages, no copy
    assert torch.equal(received.state_dict()["w"], snapshot.state_dict()["w"])


def test_a_subscriber_that_cannot_read_the_servers_file_receives_data_parts(server):
    _, address, calls, folder = server
    snapshot = _snapshot(1)
    calls["Publish"](publish_frames(snapshot), timeout=30)
    (folder / "v000001.safetensors").unlink()  # as on another host: the path is not there
    sub = PolicySubscriber(address, "actor-0", local_read=True).start()
    try:
        assert sub.wait_for_version(1, timeout=30).sha256 == snapshot.sha256  # from the cache
        assert sub.local_read is False and sub.refused == 0
    finally:
        sub.close()
