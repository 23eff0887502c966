"""A Reverb server with the run's one table, checkpointing to a fixed directory.

Reverb checkpoints to local disk. Given a run storage URI, each checkpoint is then uploaded
there with its sha256 manifest, and a server starting on a node without it downloads the stored
one (and the one before it) first, so replay survives the loss of its node.

Reverb listens on all interfaces and has no authentication (reliability.md §1.7): keep it on the
cluster's private network; robots reach replay only through the policy server's gateway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from replay.adders import ReverbSequenceAdder
from replay.archive import EpisodeArchive
from replay.config import RateLimiter, ReplayConfig, Sampler
from replay.ids import episode_key  # noqa: F401  (items name their episode by it)
from replay.ledger import LEDGER, Ledger, missing_from_replay
from replay.spec import EnvSpec, Episode
from replay.storage import Storage, join

log = logging.getLogger(__name__)


def item_signature(spec: EnvSpec, n_step: int) -> dict:
    """The Reverb signature of one (n+1)-record sequence item."""
    import tensorflow as tf

    L = n_step + 1
    signature = {
        "observation": tf.TensorSpec([L, spec.obs_dim], tf.float32),
        "action": tf.TensorSpec([L, spec.action_dim], tf.float32),
        "reward": tf.TensorSpec([L], tf.float32),
        "discount": tf.TensorSpec([L], tf.float32),
        "mask": tf.TensorSpec([L], tf.float32),
        "policy_version": tf.TensorSpec([L], tf.int64),
        "task_id": tf.TensorSpec([L], tf.int64),
        "episode_key": tf.TensorSpec([L], tf.int64),
    }
    if spec.pixels_shape:
        signature["pixels"] = tf.TensorSpec([L, *spec.pixels_shape], tf.uint8)
    return signature


MANIFEST = "pacflow_manifest.json"  # sha256 of each checkpoint file, written next to them
LATEST = "LATEST.json"  # in run storage: {"current": name, "previous": name or null}


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def newest_checkpoint_is_intact(root: Path) -> bool:
    """False when the newest complete checkpoint lacks its manifest or differs from it. Reverb
    may load a truncated file without an error (and fewer items), so this is checked before it
    loads. The manifest is written (atomically) after Reverb's DONE, so a crash between the two
    leaves a checkpoint that nothing vouches for: it counts as damaged."""
    done = sorted(p for p in root.glob("*") if (p / "DONE").exists())
    if not done:
        return True
    if not (done[-1] / MANIFEST).exists():
        return False
    return json.loads((done[-1] / MANIFEST).read_text()) == _file_hashes(done[-1])


def clean_stale_checkpoints(root: Path, previous: Path) -> list[str]:
    """Removes what a crash mid-checkpoint leaves behind; returns the paths it removed.
    Reverb's folders without DONE never load. A `<previous>.tmp` copy replaces a missing
    `previous` (the crash came between removing the old copy and renaming the new one) and is
    removed otherwise."""
    removed = [str(p) for p in root.glob("*") if p.is_dir() and not (p / "DONE").exists()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    tmp = previous.with_name(previous.name + ".tmp")
    if tmp.exists():
        if not previous.exists() and any(tmp.glob("*/DONE")):
            tmp.rename(previous)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(str(tmp))
    return removed


PARTIAL_EXIT_CODE = 70  # EX_SOFTWARE: the process exited with part of an episode in replay


class PartialEpisodeError(RuntimeError):
    """A write to replay stopped inside an episode; this server refuses later writes and
    checkpoints (`ReplayServer(exit_on_partial=...)`)."""


class ReplayCheckpointError(RuntimeError):
    """Replay cannot start from its checkpoints as configured; the message says why."""


def make_table(spec: EnvSpec, config: ReplayConfig):
    import reverb

    if config.sampler is Sampler.PRIORITIZED:
        sampler = reverb.selectors.Prioritized(config.priority_exponent)
    else:
        sampler = reverb.selectors.Uniform()
    if config.rate_limiter is RateLimiter.SAMPLE_TO_INSERT:
        limiter = reverb.rate_limiters.SampleToInsertRatio(
            config.samples_per_insert, config.min_size_to_sample, config.error_buffer)
    else:
        limiter = reverb.rate_limiters.MinSize(config.min_size_to_sample)
    return reverb.Table(name=config.table, sampler=sampler, remover=reverb.selectors.Fifo(),
                        max_size=config.max_size, rate_limiter=limiter,
                        signature=item_signature(spec, config.n_step))


class ReplayServer:
    """Owns a reverb.Server that restores from, and checkpoints to, `checkpoint_dir`.

    Reverb keeps one checkpoint and will not start from a corrupt one (reliability.md §1.1), so
    before each new checkpoint the current one is copied to `<checkpoint_dir>.previous`; a server
    whose newest checkpoint is corrupt starts from that copy instead, and says so. A checkpoint
    whose table differs from the configured one is refused with the differences named.

    Usage:
        server = ReplayServer(spec, ReplayConfig(), run_dir / "replay_checkpoints")
        server.address            # "127.0.0.1:<port>"
        server.checkpoint()
    """

    def __init__(self, spec: EnvSpec, config: ReplayConfig, checkpoint_dir: str | Path,
                 host: str = "127.0.0.1", port: int | None = None, storage: str | None = None,
                 exit_on_partial: bool = False):
        """`exit_on_partial`: a write cut short mid-episode ends the process at once (exit
        code PARTIAL_EXIT_CODE), for a process that is restarted from its checkpoint (the
        run's replay process); else the server refuses every later write and checkpoint."""
        import reverb

        self._root = Path(checkpoint_dir)
        self._previous = self._root.with_name(self._root.name + ".previous")
        self._root.mkdir(parents=True, exist_ok=True)
        for path in clean_stale_checkpoints(self._root, self._previous):
            log.warning("removed %s, left by a checkpoint that did not finish", path)
        self._storage = Storage(storage) if storage else None
        if self._storage is not None:
            self._download()
        self._config = config
        self._server = self._start(spec, port)
        self.address = f"{host}:{self._server.port}"
        self._client = reverb.Client(self.address)
        self._check_restored_table()
        # One episode written at a time, and never while a checkpoint is taken (`ingest`).
        self._lock = threading.Lock()
        self.last_checkpoint = time.time()  # of the newest checkpoint (start: none yet)
        self._writer: ReverbSequenceAdder | None = None
        self._ledger, self.reconciled = self._restored_ledger(), 0
        self._exit_on_partial, self._damaged = exit_on_partial, ""
        log.info("replay server on %s, %d items restored", self.address, self.num_items())

    def _start(self, spec: EnvSpec, port: int | None):
        import reverb

        try:
            if not newest_checkpoint_is_intact(self._root):
                raise RuntimeError("files differ from their sha256 manifest")
            return reverb.Server([make_table(spec, self._config)], port=port,
                                 checkpointer=reverb.checkpointers.DefaultCheckpointer(
                                     path=str(self._root)))
        except ValueError as e:  # e.g. the checkpoint has another table name
            raise ReplayCheckpointError(f"replay checkpoint in {self._root} does not match the "
                                        f"configured table: {e}") from None
        except RuntimeError as e:
            if not any(self._previous.glob("*/DONE")):
                raise ReplayCheckpointError(f"replay checkpoint in {self._root} is unreadable "
                                            f"({e}) and no previous good one exists") from None
            log.error("replay checkpoint in %s is unreadable (%s); starting from the previous "
                      "good one in %s", self._root, e, self._previous)
            corrupt = self._root.with_name(self._root.name + ".corrupt")
            shutil.rmtree(corrupt, ignore_errors=True)
            self._root.rename(corrupt)
            shutil.copytree(self._previous, self._root)
            return self._start(spec, port)

    def _check_restored_table(self) -> None:
        info = self._client.server_info(timeout=int(self._config.timeout_seconds))
        table = info[self._config.table]
        limiter = table.rate_limiter_info
        prioritized = self._config.sampler is Sampler.PRIORITIZED
        wanted = {"max_size": self._config.max_size,
                  "min_size_to_sample": self._config.min_size_to_sample,
                  "sampler": "prioritized" if prioritized else "uniform"}
        found = {"max_size": table.max_size, "min_size_to_sample": limiter.min_size_to_sample,
                 "sampler": "prioritized" if table.sampler_options.HasField("prioritized")
                 else "uniform"}
        diffs = [f"{k}: checkpoint {found[k]}, config {wanted[k]}" for k in wanted
                 if found[k] != wanted[k]]
        if diffs:
            self._server.stop()
            raise ReplayCheckpointError(
                f"the replay checkpoint in {self._root} was made with another table config "
                f"({'; '.join(diffs)}); Reverb would silently use the checkpoint's. Restore the "
                "old replay config, or start with an empty replay_checkpoints folder")

    def _restored_ledger(self) -> Ledger | None:
        """The ledger of the restored checkpoint; None when items came back without one (a
        checkpoint of an older pacflow): then nothing is known to be missing."""
        done = sorted(p for p in self._root.glob("*") if (p / "DONE").exists())
        ledger = Ledger.load(done[-1]) if done else Ledger()
        if ledger is None and self.num_items() == 0:
            ledger = Ledger()
        if ledger is None:
            log.warning("replay checkpoint %s has no episode ledger: archive reconciliation is "
                        "off until the next checkpoint", done[-1])
        return ledger

    def ingest(self, episode: Episode) -> int:
        """Writes the episode's items unless this server holds the episode already (by
        id); returns the items written, 0 for a repeat. Writers outside this process cannot
        be episode-atomic (Reverb inserts items one by one, and a writer killed mid-episode
        leaves some of them: docs/architecture.md, "Episode-atomic replay"); here a partial
        episode can only exist while this process lives, and dies with it.

        The writer waits for the rate limiter as long as it takes: a deadline in the middle of
        an episode would leave part of it behind in a live table."""
        episode_id = episode.lineage.episode_id
        with self._lock:
            if self._damaged:
                raise PartialEpisodeError(self._damaged)
            if self._ledger is not None and episode_id in self._ledger:
                return 0
            if self._writer is None:
                patient = dataclasses.replace(self._config, timeout_seconds=24 * 3600.0)
                self._writer = ReverbSequenceAdder(f"127.0.0.1:{self._server.port}", patient)
            try:
                items = self._writer.add_episode(episode)
            except Exception as e:
                self._cut_short(episode_id, e)
            if self._ledger is not None:
                self._ledger.add(episode_id)
            return items

    def _cut_short(self, episode_id: str, error: Exception) -> None:
        """A write failed inside an episode: some of its items may be in the live table, or
        in the writer's buffers where the next episode's items would pick them up, and Reverb
        cannot remove an item it never named. Neither may reach a sample or a checkpoint."""
        self._writer, self._damaged = None, (
            f"episode {episode_id} was cut short while written to replay "
            f"({type(error).__name__}: {error}); this server holds part of it")
        if self._exit_on_partial:  # the restart restores a checkpoint without the episode
            log.critical("%s: exiting so that the restart restores the last checkpoint and "
                         "writes the episode again from the archive", self._damaged)
            logging.shutdown()
            os._exit(PARTIAL_EXIT_CODE)
        raise PartialEpisodeError(self._damaged) from error

    def holds(self, episode_id: str) -> bool:
        with self._lock:
            return self._ledger is not None and episode_id in self._ledger

    def reconcile(self, archive: EpisodeArchive) -> int:
        """Writes every archived collect episode this server does not hold: those archived
        after the checkpoint it restored, or whose write to replay failed. Returns how many."""
        if self._ledger is None:
            return 0
        count = 0
        for path in missing_from_replay(archive, self._ledger):
            count += self.ingest(archive.read(path)) > 0
        self.reconciled += count
        if count:
            log.warning("replay reconciled with the archive: %d episodes written again", count)
        return count

    def rate_stats(self) -> dict[str, float]:
        """Items held, inserts and samples completed since the server started, the rate
        limiter's bounds on `inserts * samples_per_insert - samples`, the episodes the ledger
        names, and the episodes reconciliation wrote again."""
        info = self._client.server_info(timeout=int(self._config.timeout_seconds))
        table = info[self._config.table]
        limiter = table.rate_limiter_info
        return {"items": int(table.current_size), "inserts": int(limiter.insert_stats.completed),
                "samples": int(limiter.sample_stats.completed),
                "samples_per_insert": float(limiter.samples_per_insert),
                "min_diff": float(limiter.min_diff), "max_diff": float(limiter.max_diff),
                "min_size_to_sample": int(limiter.min_size_to_sample),
                "episodes": len(self._ledger) if self._ledger is not None else -1,
                "reconciled": self.reconciled}

    def num_items(self) -> int:
        info = self._client.server_info(timeout=int(self._config.timeout_seconds))
        return int(info[self._config.table].current_size)

    def checkpoint(self, wait_seconds: float = 60.0) -> str:
        """Keeps a copy of the current checkpoint, then writes a new one with its ledger;
        returns its path. It waits for an episode being written to finish, so a checkpoint
        holds whole episodes only; "" when that took longer than `wait_seconds` (a write held
        by the rate limiter) and no checkpoint was taken."""
        if not self._lock.acquire(timeout=wait_seconds):
            log.warning("replay checkpoint skipped: an episode write held it up %.0f s",
                        wait_seconds)
            return ""
        try:
            if self._damaged:
                raise PartialEpisodeError(self._damaged)
            current = sorted(p for p in self._root.glob("*") if (p / "DONE").exists())
            if current:
                tmp = self._previous.with_name(self._previous.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(current[-1], tmp / current[-1].name)
                shutil.rmtree(self._previous, ignore_errors=True)
                tmp.rename(self._previous)
            path = Path(self._client.checkpoint())
            store = Storage(path)
            if self._ledger is not None:  # None: restored from an older checkpoint without one
                store.put_bytes(LEDGER, self._ledger.to_bytes())
            store.put_bytes(MANIFEST, json.dumps(_file_hashes(path)).encode())  # atomic, last
            self.last_checkpoint = time.time()
        finally:
            self._lock.release()
        if self._storage is not None:
            return self._upload(path)
        return str(path)

    def _upload(self, path: Path) -> str:
        """Copies checkpoint `path` to storage, then points LATEST at it (with the one before
        as `previous`) and deletes older copies there; returns its storage URI."""
        store = self._storage
        old = json.loads(store.get_bytes(LATEST)) if store.exists(LATEST) else {}
        for p in sorted(path.iterdir()):  # the manifest and DONE last: they mark it complete
            if p.name not in (MANIFEST, "DONE"):
                store.put_file(p, f"{path.name}/{p.name}")
        for name in (MANIFEST, "DONE"):
            if (path / name).exists():
                store.put_file(path / name, f"{path.name}/{name}")
        previous = old.get("current") if old.get("current") != path.name else old.get("previous")
        store.put_bytes(LATEST, json.dumps({"current": path.name, "previous": previous}).encode())
        for name in store.list_dirs():
            if name not in (path.name, previous):
                store.delete_dir(name)
        return join(store.uri, path.name)

    def _download(self) -> None:
        """Brings the stored newest checkpoint (and the one before it) to the local folder when
        this node does not hold it, e.g. after a restart on another node."""
        store = self._storage
        if not store.exists(LATEST):
            return
        latest = json.loads(store.get_bytes(LATEST))
        for name, local in ((latest["current"], self._root), (latest.get("previous"),
                                                                self._previous)):
            if name and not (local / name / "DONE").exists():
                shutil.rmtree(local, ignore_errors=True)
                store.download_dir(name, local / name)
                log.info("replay checkpoint %s downloaded from %s", name, store.uri)

    def stop(self) -> None:
        self._server.stop()


def sample_items(address: str, table: str, num_items: int) -> dict[str, np.ndarray]:
    """Samples `num_items` items (with replacement) as stacked arrays; for inspection and tests."""
    import reverb

    client = reverb.Client(address)
    samples = list(client.sample(table, num_samples=num_items, emit_timesteps=False,
                                 unpack_as_table_signature=True))
    return {k: np.stack([s.data[k] for s in samples]) for k in samples[0].data}
