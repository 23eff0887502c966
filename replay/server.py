"""A Reverb server with the run's one table, checkpointing to a fixed directory.

Reverb listens on all interfaces and has no authentication (reliability.md §1.7): keep it on the
cluster's private network; robots reach replay only through the policy server's gateway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from replay.config import ReplayConfig
from replay.spec import EnvSpec

log = logging.getLogger(__name__)


def item_signature(spec: EnvSpec, n_step: int) -> dict:
    """The Reverb signature of one (n+1)-record sequence item."""
    import tensorflow as tf

    L = n_step + 1
    return {
        "observation": tf.TensorSpec([L, spec.obs_dim], tf.float32),
        "action": tf.TensorSpec([L, spec.action_dim], tf.float32),
        "reward": tf.TensorSpec([L], tf.float32),
        "discount": tf.TensorSpec([L], tf.float32),
        "mask": tf.TensorSpec([L], tf.float32),
        "policy_version": tf.TensorSpec([L], tf.int64),
        "task_id": tf.TensorSpec([L], tf.int64),
        "episode_key": tf.TensorSpec([L], tf.int64),
    }


def episode_key(episode_id: str) -> int:
    """A 63-bit integer for an episode uuid hex, so replay items can name their episode."""
    return int(episode_id[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


class ReplayServer:
    """Owns a reverb.Server. Restores from `checkpoint_dir` when it holds a checkpoint.

    Usage:
        server = ReplayServer(spec, ReplayConfig(), run_dir / "replay_checkpoints")
        server.address            # "127.0.0.1:<port>"
        server.checkpoint()
    """

    def __init__(self, spec: EnvSpec, config: ReplayConfig, checkpoint_dir: str | Path,
                 host: str = "127.0.0.1", port: int | None = None):
        import reverb

        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        table = reverb.Table(
            name=config.table,
            sampler=reverb.selectors.Uniform(),
            remover=reverb.selectors.Fifo(),
            max_size=config.max_size,
            rate_limiter=reverb.rate_limiters.MinSize(config.min_size_to_sample),
            signature=item_signature(spec, config.n_step),
        )
        checkpointer = reverb.checkpointers.DefaultCheckpointer(path=str(checkpoint_dir))
        self._server = reverb.Server([table], port=port, checkpointer=checkpointer)
        self._config = config
        self.address = f"{host}:{self._server.port}"
        self._client = reverb.Client(self.address)
        log.info("replay server on %s, %d items restored", self.address, self.num_items())

    def num_items(self) -> int:
        info = self._client.server_info(timeout=int(self._config.timeout_seconds))
        return int(info[self._config.table].current_size)

    def checkpoint(self) -> str:
        return self._client.checkpoint()

    def stop(self) -> None:
        self._server.stop()


def sample_items(address: str, table: str, num_items: int) -> dict[str, np.ndarray]:
    """Samples `num_items` items (with replacement) as stacked arrays; for inspection and tests."""
    import reverb

    client = reverb.Client(address)
    samples = list(client.sample(table, num_samples=num_items, emit_timesteps=False,
                                 unpack_as_table_signature=True))
    return {k: np.stack([s.data[k] for s in samples]) for k in samples[0].data}
