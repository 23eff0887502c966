"""Remote inference for thin robot clients: concurrent Act calls share one forward pass.

Callers enqueue a request and wait on a future; one thread takes the first waiting request,
gathers whatever else arrives within `max_wait_seconds` (up to `max_batch`), groups the batch by
the policy version each caller should run (pins may differ per client), and answers each group
with one batched `PACPolicy.act`.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

from policies.policy import PACPolicy
from policies.proto import policy_pb2 as pb
from policies.snapshot import Snapshot
from replay.spec import EnvSpec

_STOP = object()


@dataclasses.dataclass(frozen=True)
class _Call:
    observation: np.ndarray  # (obs_dim,) float32, checked
    task_id: int
    pixels: np.ndarray | None  # (H, W, 3) uint8, checked
    greedy: bool


class ActBatcher:
    """Batches Act requests across callers.

    Usage:
        batcher = ActBatcher(snapshot_for=lambda client_id: store_snapshot)
        action, version = batcher.act(request, "robot-1", timeout=1.0)
    """

    def __init__(self, snapshot_for: Callable[[str], Snapshot | None], max_batch: int = 64,
                 max_wait_seconds: float = 0.002):
        self._snapshot_for = snapshot_for
        self._max_batch, self._max_wait = max_batch, max_wait_seconds
        self._queue: queue.Queue = queue.Queue()
        self._policies: dict[int, PACPolicy] = {}
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # forward passes
        self._thread = threading.Thread(target=self._run, name="act-batcher", daemon=True)
        self._thread.start()

    def act(self, request: pb.ActRequest, client_id: str,
            timeout: float | None) -> tuple[np.ndarray, int]:
        """(action (A,) float32, policy version) for `client_id` (the caller's bound id, not
        `request.client_id`); LookupError when no policy exists yet."""
        snapshot = self._snapshot_for(client_id)
        if snapshot is None:
            raise LookupError("no policy has been published yet")
        spec = EnvSpec.from_dict(snapshot.metadata["env_spec"])
        if not 0 <= request.task_id < spec.num_tasks:
            raise ValueError(f"task_id {request.task_id} outside [0, {spec.num_tasks})")
        obs = _vector(request.observation, spec.obs_dim, "observation")  # (obs_dim,)
        pixels = _image(request.pixels, spec.pixels_shape) if spec.pixels_shape else None
        future: Future = Future()
        self._queue.put((_Call(obs, request.task_id, pixels, request.greedy), snapshot, future))
        return future.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(_STOP)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline = [first], time.monotonic() + self._max_wait
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            groups: dict[tuple[int, bool], list] = collections.defaultdict(list)
            for item in batch:  # one forward pass per (version, greedy)
                groups[(item[1].version, item[0].greedy)].append(item)
            for items in groups.values():
                self._answer(items)

    def _answer(self, items: list) -> None:
        """One forward pass for callers that run the same version."""
        try:
            policy = self._policy(items[0][1])
            calls = [c for c, _, _ in items]
            obs = np.stack([c.observation for c in calls])  # (B, obs_dim)
            task = np.array([c.task_id for c in calls], np.int64)  # (B,)
            pixels = None if calls[0].pixels is None else \
                np.stack([c.pixels for c in calls])  # (B, H, W, 3)
            actions = policy.act(obs, task, calls[0].greedy, pixels)  # (B, A)
            self.batch_sizes[len(items)] += 1
            for (_, snapshot, future), action in zip(items, actions):
                future.set_result((action, snapshot.version))
        except Exception as e:  # every caller of the group learns why
            for _, _, future in items:
                if not future.done():
                    future.set_exception(e)

    def _policy(self, snapshot: Snapshot) -> PACPolicy:
        if snapshot.version not in self._policies:
            if len(self._policies) >= 4:  # keep a few versions (pins may differ per client)
                self._policies.pop(min(self._policies))
            self._policies[snapshot.version] = PACPolicy.from_snapshot(snapshot, seed=0)
        return self._policies[snapshot.version]


def _vector(values, size: int, name: str) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if v.shape != (size,) or not np.isfinite(v).all():
        raise ValueError(f"{name}: expected {size} finite floats, got shape {v.shape}")
    return v


def _image(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    if len(data) != int(np.prod(shape)):
        raise ValueError(f"pixels: expected {int(np.prod(shape))} bytes for {shape}, "
                         f"got {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(shape)
