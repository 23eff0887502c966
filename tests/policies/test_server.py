"""The gRPC policy server on a free loopback port, with real subscribers."""

import grpc
import pytest
import torch

from policies.perceiver import PerceiverActorCritic
from policies.policy import PACPolicy
from policies.client import PolicySubscriber, fetch, publish
from policies.server import PolicyServer
from policies.snapshot import Snapshot, SnapshotError, snapshot_metadata
from tests.fakes import SPEC, TINY_MODEL


def _snapshot(version: int, seed: int = 0) -> Snapshot:
    torch.manual_seed(seed)
    model = PerceiverActorCritic(SPEC, TINY_MODEL)
    meta = snapshot_metadata(SPEC.to_dict(), TINY_MODEL, version - 1, 0, version - 1)
    return Snapshot.from_state_dict(version, model.state_dict(), meta)


@pytest.fixture()
def server(tmp_path):
    srv = PolicyServer(tmp_path / "policies", port=0)
    address = srv.start()
    yield srv, address
    srv.stop()


def test_subscribers_receive_each_published_version(server):
    srv, address = server
    subs = [PolicySubscriber(address, f"actor-{i}").start() for i in range(2)]
    try:
        assert all(s.latest() is None for s in subs)
        publish(address, _snapshot(1))
        for s in subs:
            assert s.wait_for_version(1, timeout=10).version == 1
        publish(address, _snapshot(2, seed=1))
        for s in subs:
            got = s.wait_for_version(2, timeout=10)
            assert got.sha256 == _snapshot(2, seed=1).sha256
        policy = PACPolicy.from_snapshot(subs[0].latest(), seed=0)
        assert policy.policy_version == 2
        assert policy.act(torch.zeros(3, SPEC.obs_dim).numpy(), [0, 0, 0], greedy=True).shape == \
            (3, SPEC.action_dim)
    finally:
        for s in subs:
            s.close()


def test_version_regression_and_bad_hash_are_refused(server):
    srv, address = server
    publish(address, _snapshot(2))
    with pytest.raises(grpc.RpcError) as err:
        publish(address, _snapshot(1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert srv.latest_version == 2


def test_snapshot_with_wrong_hash_or_nan_is_refused():
    snap = _snapshot(1)
    with pytest.raises(SnapshotError, match="sha256"):
        snap.verify("0" * 64)
    state = {k: v.clone() for k, v in snap.state_dict().items()}
    next(iter(state.values())).view(-1)[0] = float("nan")
    with pytest.raises(SnapshotError, match="non-finite"):
        Snapshot.from_state_dict(1, state, snap.metadata).state_dict()


def test_restarted_server_serves_stored_versions(tmp_path):
    first = PolicyServer(tmp_path, port=0)
    address = first.start()
    publish(address, _snapshot(1))
    first.stop()
    second = PolicyServer(tmp_path, port=0)
    address = second.start()
    try:
        assert fetch(address).version == 1
        sub = PolicySubscriber(address, "late-joiner").start()
        assert sub.wait_for_version(1, timeout=10).version == 1
        sub.close()
    finally:
        second.stop()


def test_store_keeps_few_versions_in_memory_and_hash_checks_older_ones(tmp_path):
    from policies.store import PolicyStore
    from policies.stream import parse_frame

    store = PolicyStore(tmp_path, cached_versions=2)
    for v in range(1, 6):
        store.add(_snapshot(v, seed=v))
    assert len(store._cache) == 2 and sorted(store._cache) == [4, 5]
    old, frames = store.get(1)  # read back from disk
    assert old.sha256 == _snapshot(1, seed=1).sha256
    assert b"".join(parse_frame(f) for f in frames) == old.weights
    assert list(store._cache) == [5, 1]  # least recently used first
    weights = tmp_path / "v000002.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="sha256"):
        store.get(2)
    assert PolicyStore(tmp_path).latest == 5  # a restart reads metadata only


def _resident_pages(path) -> int:
    """How many of a file's pages are in the page cache (mincore on a mapping that touches
    none of them)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    buf = ctypes.c_char.from_buffer(mapped)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    try:
        assert libc.mincore(ctypes.addressof(buf), size, vec) == 0, ctypes.get_errno()
        return sum(b & 1 for b in vec)
    finally:
        del buf
        mapped.close()


def test_versions_pushed_out_of_the_cache_leave_the_page_cache(tmp_path):
    import mmap

    from policies.store import PolicyStore

    mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    _, fs_type = max((m for m in mounts if str(tmp_path).startswith(m[0].rstrip("/") + "/")),
                     key=lambda m: len(m[0]))
    if fs_type == "tmpfs":
        pytest.skip("tmpfs pages cannot be dropped from the page cache")
    store = PolicyStore(tmp_path, cached_versions=2)
    for v in range(1, 5):
        store.add(_snapshot(v, seed=v))
    files = {v: tmp_path / f"v{v:06d}.safetensors" for v in range(1, 5)}
    pages = {v: _resident_pages(f) for v, f in files.items()}
    full = -(-files[4].stat().st_size // mmap.PAGESIZE)  # pages in a whole file
    assert pages[1] == pages[2] == 0, pages  # pushed out: no one is served from them
    assert pages[3] == pages[4] == full, pages  # cached: held as the mapped file
    old, _ = store.get(1)  # still read back from disk, hash-checked; pushes v3 out
    assert old.sha256 == _snapshot(1, seed=1).sha256
    assert _resident_pages(files[3]) == 0 and _resident_pages(files[1]) > 0
