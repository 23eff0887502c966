"""The processes of `pacflow bench policy-push` (cluster/bench_push.py): the publisher, each
subscriber (ours and the Ray baseline's), and the relay, as Ray actors, with the memory
accounting each reports."""

from __future__ import annotations

import ctypes
import gc
import struct
import threading
import time
from pathlib import Path

import ray
import torch

from policies.client import PolicySubscriber, publish, weight_shapes
from policies.relay import PolicyRelay
from policies.snapshot import Snapshot

WAIT_SECONDS = 600.0  # per version; a stuck subscriber fails the bench instead of hanging it


def make_weights(num_params: int) -> bytearray:
    """Safetensors bytes of a few float32 tensors holding `num_params` values in all."""
    sizes = [num_params // 2, num_params // 4]
    sizes.append(num_params - sum(sizes))
    generator = torch.Generator().manual_seed(num_params)
    state = {f"layer{i}.weight": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}
    return bytearray(Snapshot.from_state_dict(1, state, {}).weights)


class PublisherWorker:
    """The learner's role: builds one snapshot per version and sends it, by gRPC or by Ray."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self._weights = bytearray()

    def prepare(self, num_params: int) -> int:
        self._weights = bytearray()
        release_memory()
        self._weights = make_weights(num_params)
        return len(self._weights)

    def _snapshot(self, version: int) -> Snapshot:
        # Rewrite the last float so each version's bytes (and sha256) differ, without re-encoding.
        self._weights[-4:] = struct.pack("<f", float(version))
        return Snapshot(version, {"bench": "policy-push", "learner_step": version},
                        bytes(self._weights))

    def publish(self, address: str, version: int) -> dict:
        snapshot = self._snapshot(version)
        sha256 = snapshot.sha256
        start = time.time()
        publish(address, snapshot, timeout=WAIT_SECONDS)
        return {"start": start, "returned": time.time(), "sha256": sha256}

    def broadcast(self, subscribers: list, version: int) -> dict:
        """The Ray baseline: one put, every subscriber gets and checks it."""
        snapshot = self._snapshot(version)
        sha256 = snapshot.sha256
        start = time.time()
        ref = ray.put(snapshot.weights)
        put_done = time.time()
        held = ray.get([s.take_from_store.remote([ref], version, sha256) for s in subscribers])
        return {"start": start, "put_done": put_done, "sha256": sha256, "held": held}


class SubscriberWorker:
    """One subscriber process: a real PolicySubscriber, and the baseline's Ray get."""

    def __init__(self, index: int) -> None:
        torch.set_num_threads(1)
        self._client_id = f"bench-{index}"
        self._sub: PolicySubscriber | None = None
        self._held: Snapshot | None = None  # the baseline's held version
        self._waiter: threading.Thread | None = None
        self._result: dict = {}
        self._base_rss = 0

    def subscribe(self, address: str, local_read: bool) -> None:
        self.release()
        self._base_rss = _status_bytes("VmRSS")  # before any version of this case
        self._sub = PolicySubscriber(address, self._client_id, local_read=local_read).start()

    def arm(self, version: int) -> None:
        """Starts waiting for `version` on a thread; returns once the wait has begun."""
        started = threading.Event()

        def wait() -> None:
            started.set()
            try:
                self._sub.wait_for_version(version, timeout=WAIT_SECONDS)
                held_at, peak = time.time(), _status_bytes("VmHWM")
                self._result = {"held_at": held_at, "peak_growth": peak - before,
                                "peak_over_base": peak - self._base_rss}
            except TimeoutError as e:
                self._result = {"error": str(e)}

        self._result = {}
        before = _reset_peak()
        self._waiter = threading.Thread(target=wait, daemon=True)
        self._waiter.start()
        started.wait()

    def held(self) -> dict:
        """The armed wait's outcome and what this subscriber holds now."""
        self._waiter.join()
        snapshot = self._sub.latest()
        return {**self._result, **_holding(snapshot), "local_read": self._sub.local_read}

    def take_from_store(self, refs: list, version: int, sha256: str) -> dict:
        self._held = None  # in Ray's favour: it never holds two versions
        before = _reset_peak()
        start = time.time()
        snapshot = Snapshot(version, {}, ray.get(refs[0]))
        got = time.time()
        snapshot.verify(sha256)
        weight_shapes(snapshot)  # the subscriber's decode check: finite values, names, shapes
        self._held = snapshot
        held_at = time.time()
        return {"held_at": held_at, "get_s": got - start, "check_s": held_at - got,
                "peak_growth": _status_bytes("VmHWM") - before, **_holding(snapshot)}

    def release(self) -> None:
        if self._sub is not None:
            self._sub.close()
        self._sub = self._held = None
        release_memory()


class RelayWorker:
    """Another host's policy relay (policies/relay.py): one streamed subscription to the
    server, stored in its own files, which the subscribers read (local_read)."""

    def __init__(self) -> None:
        self._relay: PolicyRelay | None = None

    def start(self, upstream: str, directory: str) -> str:
        self._relay = PolicyRelay(upstream, directory, client_id="bench-relay").start()
        return self._relay.address

    def stop(self) -> None:
        self._relay.stop()
        self._relay = None
        release_memory()


def release_memory() -> None:
    """Frees what the previous case left behind, heap pages included (glibc keeps them)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` memory field (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """Resets this process's peak RSS (Linux: clear_refs 5; read it back as VmHWM) and returns
    its RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _holding(snapshot: Snapshot | None) -> dict:
    return {"version": snapshot.version if snapshot else 0,
            "sha256": snapshot.sha256 if snapshot else ""}
