"""Snapshot streams (policies/stream.py): frames and the receiver checking parts as they arrive."""

import numpy as np
import pytest
import torch

from policies.proto import policy_pb2 as pb
from policies.snapshot import Snapshot, SnapshotError, all_finite, decode_weights, tensor_layout
from policies.stream import SnapshotReceiver, data_frame, end_frame, parse_frame, \
    publish_frames, read_snapshots
from policies.wire import WireError

STATE = {"a.weight": torch.randn(300, 7), "b.bias": torch.arange(11, dtype=torch.float16),
         "c.count": torch.tensor([3, 4], dtype=torch.int64), "d.empty": torch.zeros(0, 5)}


def _parts(snapshot: Snapshot, chunk_bytes: int = 1000) -> list:
    return [parse_frame(f) for f in publish_frames(snapshot, chunk_bytes=chunk_bytes)]


def test_a_data_frame_is_the_protobuf_encoding_and_parses_without_a_copy():
    for size in (0, 1, 127, 128, 300_000):
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        frame = data_frame(memoryview(payload))
        assert frame == pb.SnapshotChunk(data=payload).SerializeToString()
        part = parse_frame(frame)
        assert isinstance(part, memoryview) and part.obj is frame and bytes(part) == payload
    end = parse_frame(end_frame(3, "ab" * 32, committed=False, reason="no"))
    assert end.WhichOneof("part") == "end" and (end.end.version, end.end.committed) == (3, False)


def test_received_tensors_are_views_into_one_buffer_and_equal_the_published_ones():
    snapshot = Snapshot.from_state_dict(4, STATE, {"cycle": 2})
    (received, header), = read_snapshots(_parts(snapshot, chunk_bytes=333))
    assert received.sha256 == snapshot.sha256 and received.metadata == {"cycle": 2}
    assert header.sha256 == ""  # a publisher announces its hash at the end
    # checked while it arrived, so state_dict() does not check again; bytes from elsewhere are
    assert received.finite_checked and not snapshot.finite_checked
    buffer = np.asarray(received.weights)
    low, high = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    tensors = received.state_dict()
    assert received.shapes() == {k: tuple(v.shape) for k, v in STATE.items()}
    for name, original in STATE.items():
        assert torch.equal(tensors[name], original)
        if original.numel():  # no copy: the tensor's bytes are the received buffer's
            assert low <= tensors[name].data_ptr() < high
    assert decode_weights(snapshot.weights)["a.weight"].data_ptr() != \
        tensors["a.weight"].data_ptr()  # read-only bytes decode to copies


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_as_soon_as_their_tensor_is_in(bad):
    state = {"first": torch.ones(10), "bad": torch.ones(1000), "last": torch.ones(100_000)}
    state["bad"][500] = bad
    snapshot = Snapshot.from_state_dict(1, state, {})
    layout = {s.name: s for s in tensor_layout(snapshot.weights, snapshot.num_bytes)}
    parts = _parts(snapshot, chunk_bytes=256)
    receiver = SnapshotReceiver(parts[0].header)
    with pytest.raises(SnapshotError, match="non-finite values in bad"):
        for part in parts[1:-1]:
            receiver.add(part)
    assert layout["bad"].end <= receiver.size < layout["last"].end  # before the rest arrived


def test_all_finite_is_exact_for_large_finite_values():
    assert all_finite(torch.full((1000,), 3e38))  # a float32 sum would overflow to inf
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))
    assert all_finite(torch.tensor([1e308, 1e308], dtype=torch.float64))  # the sum overflows
    assert not all_finite(torch.tensor([1.0, -float("inf")], dtype=torch.float64))
    assert all_finite(torch.tensor([1, 2]))


def test_a_wrong_hash_a_short_stream_or_a_bad_header_is_refused():
    snapshot = Snapshot.from_state_dict(2, STATE, {})
    parts = _parts(snapshot)
    wrong = pb.SnapshotChunk(end=pb.SnapshotEnd(version=2, sha256="0" * 64, committed=True))
    with pytest.raises(SnapshotError, match="does not match the announced"):
        list(read_snapshots(parts[:-1] + [wrong]))
    with pytest.raises(WireError, match="ended after"):
        list(read_snapshots(parts[:-2] + parts[-1:]))
    with pytest.raises(WireError, match="before its header"):
        list(read_snapshots(parts[1:]))
    blob = bytearray(snapshot.weights)
    blob[8:10] = b"[]"  # the JSON header is no longer an object
    with pytest.raises(SnapshotError, match="unreadable safetensors header"):
        tensor_layout(blob, len(blob))
    shifted = Snapshot.from_state_dict(2, {"w": torch.ones(4)}, {})
    with pytest.raises(SnapshotError, match="data ends at byte"):
        tensor_layout(bytes(shifted.weights) + b"\0\0\0\0", shifted.num_bytes + 4)


def test_an_uncommitted_end_drops_the_snapshot_and_reads_on():
    first, second = (Snapshot.from_state_dict(v, STATE, {}) for v in (1, 2))
    dropped = []
    stream = _parts(first)[:-1] + [pb.SnapshotChunk(end=pb.SnapshotEnd(
        version=1, committed=False, reason="the server could not store it"))] + _parts(second)
    got = [s.version for s, _ in read_snapshots(stream, on_dropped=dropped.append)]
    assert got == [2] and [d.reason for d in dropped] == ["the server could not store it"]


def test_a_spare_buffer_is_reused_only_once_nothing_refers_to_it():
    from policies.stream import SpareBuffer, new_buffer

    spares = SpareBuffer()
    first = new_buffer(1000)
    held = first[10:20]  # a tensor view of the old snapshot, still alive
    spares.give(first)
    first_id = id(first)
    del first
    assert id(spares.take(1000)) != first_id  # still referred to: a new one
    second = new_buffer(1000)
    spares.give(second)
    second_id = id(second)
    del second, held
    assert id(spares.take(500)) != second_id  # another size: a new one
    third = new_buffer(1000)
    spares.give(third)
    third_id = id(third)
    del third
    assert id(spares.take(1000)) == third_id  # nothing else refers to it: the same buffer
