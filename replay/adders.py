"""Reverb adders: finished episodes in, (n+1)-record sequence items out.

For an episode with records 0..T (record T is the final observation, mask 0) the adder writes one
item per transition, starting at records 0..T-1. Items near the end are completed with n-1 padding
records (the final observation again, zero action/reward/discount, mask 0) so every item has the
same shape; the learner's n-step return stops at the first masked record.
"""

from __future__ import annotations

import collections
import logging

import numpy as np

from replay.config import ReplayConfig
from replay.reconnect import Resolver, announced, new_incarnation
from replay.ids import episode_key
from replay.spec import Adder, Episode

log = logging.getLogger(__name__)


def episode_records(episode: Episode, n_step: int) -> dict[str, np.ndarray]:
    """The T+1 records of an episode followed by n_step-1 padding records, column-wise."""
    T, pad = episode.length, n_step - 1
    last = lambda x: np.repeat(x[-1:], pad, axis=0)  # noqa: E731
    zeros = lambda x: np.zeros((pad,) + x.shape[1:], x.dtype)  # noqa: E731
    key = episode_key(episode.lineage.episode_id)
    total = T + 1 + pad
    records = {
        "observation": np.concatenate([episode.observation, last(episode.observation)]),
        "action": np.concatenate([episode.action, zeros(episode.action)]),
        "reward": np.concatenate([episode.reward, zeros(episode.reward)]),
        "discount": np.concatenate([episode.discount, zeros(episode.discount)]),
        "mask": np.concatenate([episode.mask, np.zeros(pad, np.float32)]),
        "policy_version": np.concatenate([episode.policy_version,
                                          last(episode.policy_version)]).astype(np.int64),
        "task_id": np.full(total, episode.task_id, np.int64),
        "episode_key": np.full(total, key, np.int64),
    }
    if episode.pixels is not None:  # (T+1+pad, H, W, 3) uint8
        records["pixels"] = np.concatenate([episode.pixels, last(episode.pixels)])
    return records


def check_priorities(priorities: np.ndarray | None, num_items: int) -> np.ndarray:
    """Per-item priorities, (num_items,) float64; all ones when none are given."""
    if priorities is None:
        return np.ones(num_items)
    p = np.asarray(priorities, np.float64)
    if p.shape != (num_items,) or not (np.isfinite(p).all() and (p > 0).all()):
        raise ValueError(f"priorities must be {num_items} finite positive numbers, one per item; "
                         f"got shape {p.shape}")
    return p


class ReverbSequenceAdder(Adder):
    """Writes each episode's items through one Reverb TrajectoryWriter.

    Back-pressure: after every `max_in_flight_items` items the writer waits until the server has
    confirmed them, so an actor never buffers more than that. Every wait has a deadline.

    Usage:
        adder = ReverbSequenceAdder("127.0.0.1:1234", ReplayConfig(n_step=3))
        adder.add_episode(episode)
    """

    def __init__(self, address: str, config: ReplayConfig, resolve: Resolver | None = None):
        self._address, self._config, self._resolve = address, config, resolve
        self._address, self._incarnation = announced(resolve, address)
        self.num_reconnects = 0
        self._connect()

    def _connect(self) -> None:
        import reverb

        self._client = reverb.Client(self._address)
        self._writer = self._client.trajectory_writer(
            num_keep_alive_refs=self._config.n_step + 1)

    def add_episode(self, episode: Episode, priorities: np.ndarray | None = None) -> int:
        """`priorities` (T,) positive floats, one per item (by its first record); default 1.

        With a resolver (replay/reconnect.py): when a call misses its deadline because the
        server died, the adder waits up to `timeout_seconds` for its restarted incarnation,
        which restored its checkpoint without this episode's items, reconnects, and writes the
        whole episode again. A server that is alive but held the items back (its rate limiter)
        is an error, as without a resolver."""
        import reverb

        try:
            return self._add(episode, priorities)
        except reverb.errors.DeadlineExceededError:
            if self._resolve is None:
                raise
            found = new_incarnation(self._resolve, self._incarnation, self._address,
                                    self._config.timeout_seconds)
            if found is None:
                raise
            log.warning("replay restarted (%s -> %s); writing episode %s again",
                        self._address, found[0], episode.lineage.episode_id)
            (self._address, self._incarnation), self.num_reconnects = found, \
                self.num_reconnects + 1
            self._connect()
            return self._add(episode, priorities)

    def _add(self, episode: Episode, priorities: np.ndarray | None) -> int:
        cfg = self._config
        L, timeout_ms = cfg.n_step + 1, int(cfg.timeout_seconds * 1000)
        priorities = check_priorities(priorities, episode.length)
        records = episode_records(episode, cfg.n_step)
        # Reverb's C++ writer directly: its Python wrapper flattens each record's and each
        # item's structure again, as much work as the rest (a 500-record walker episode:
        # 59 ms through it, 30 ms without; docs/benchmarks.md "Replay").
        # Columns in the table signature's order: a dict flattens in sorted-key order.
        columns = [records[k] for k in sorted(records)]
        writer, squeeze = self._writer._writer, [False] * len(columns)
        window: collections.deque[list] = collections.deque(maxlen=L)  # per record: its refs
        num_records, num_items = records["reward"].shape[0], 0
        for j in range(num_records):
            window.append(writer.Append([c[j] for c in columns]))
            start = j - cfg.n_step
            if 0 <= start < episode.length:  # the item of records start..j, column-wise
                writer.CreateItem(cfg.table, float(priorities[start]),
                                  [list(refs) for refs in zip(*window)], squeeze)
                num_items += 1
                if num_items % cfg.max_in_flight_items == 0:
                    self._writer.flush(block_until_num_items=cfg.max_in_flight_items,
                                       timeout_ms=timeout_ms)
        self._writer.end_episode(clear_buffers=True, timeout_ms=timeout_ms)
        return num_items

    def close(self) -> None:
        self._writer.close()
