"""`pacflow train-offline`: retrain PAC from an episode archive in one process.

The archive's collected episodes (optionally filtered, e.g. `--where "cycle <= 3"`) are loaded into
an in-process Reverb table through the same adder the actors use, the same PACLearner trains on
it, and the result is checkpointed, evaluated greedily and saved as a snapshot that records which
data it was trained on (archive manifest hash, episode count, filter).

With `stream=True` (`--stream`, for archives larger than memory) the episodes are not loaded up
front: a thread reads them through Ray Data (parallel Parquet reads, bounded memory) into the
table, pass after pass, while the learner trains. The table's `replay.max_size` bounds memory
(FIFO eviction); `replay.rate_limiter: sample_to_insert` holds the learner's reuse of each item.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import operator
import re
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from actors.loop import EnvironmentLoop, EpisodeContext
from actors.robot_spec import is_robot_task
from cluster.config import EnvConfig, ExperimentConfig, config_to_dict
from learners.checkpoints import save_checkpoint
from learners.learner import PACLearner
from policies.policy import PACPolicy, Policy
from policies.snapshot import Snapshot, save_snapshot, snapshot_metadata
from replay.adders import ReverbSequenceAdder
from replay.archive import EpisodeArchive, episodes_from_blocks
from replay.dataset import ReverbBatchIterator
from replay.server import ReplayServer
from replay.spec import EnvSpec

log = logging.getLogger(__name__)

_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
        "<": operator.lt, ">": operator.gt}
_CLAUSE = re.compile(r"^\s*(\w+)\s*(<=|>=|==|!=|<|>)\s*('[^']*'|-?\d+(?:\.\d+)?)\s*$")


class FilterError(ValueError):
    """A --where expression that cannot be parsed or names an unknown column."""


def parse_where(where: str | None, columns: set[str]):
    """'cycle <= 3 and mode == \\'collect\\'' -> a predicate over a row dict."""
    clauses = []
    for part in re.split(r"\s+and\s+", where or "") if where else []:
        m = _CLAUSE.match(part)
        if not m:
            raise FilterError(f"--where: cannot parse {part!r} (use e.g. \"cycle <= 3\")")
        name, op, raw = m.groups()
        if name not in columns:
            raise FilterError(f"--where: unknown column {name!r}; "
                              f"columns: {', '.join(sorted(columns))}")
        value = raw[1:-1] if raw.startswith("'") else (float(raw) if "." in raw else int(raw))
        clauses.append((name, _OPS[op], value))
    return lambda row: all(op(row[name], value) for name, op, value in clauses)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The collected episodes a filter selects, known from their metadata alone."""

    episode_ids: list[str]  # sorted
    returns: np.ndarray  # (E,) episode returns, in episode_ids order
    manifest_hash: str  # sha256 of the sorted ids: names exactly this training set


def select_episodes(archive: EpisodeArchive, where: str | None) -> Selection:
    """Collected episodes passing the filter (reads one row of metadata per episode)."""
    table = archive.episode_table()
    keep = parse_where(where, set(table.column_names))
    rows = sorted((r for r in table.to_pylist() if r["mode"] == "collect" and keep(r)),
                  key=lambda r: r["episode_id"])
    ids = [r["episode_id"] for r in rows]
    return Selection(ids, np.asarray([r["return"] for r in rows], np.float64),
                     hashlib.sha256("\n".join(ids).encode()).hexdigest())


class StreamFeeder:
    """Feeds the selected episodes from the archive into replay through Ray Data, pass after
    pass, until stopped. Errors are kept and re-raised by `stop`.

    Usage:
        feeder = StreamFeeder(archive, selection.episode_ids, spec, adder).start()
        ...   # train
        feeder.stop()
    """

    def __init__(self, archive: EpisodeArchive, episode_ids: list[str], spec: EnvSpec,
                 adder: ReverbSequenceAdder):
        self._archive, self._ids, self._spec, self._adder = archive, episode_ids, spec, adder
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-stream", daemon=True)
        self.num_episodes = 0  # episodes written, over all passes

    def start(self) -> "StreamFeeder":
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        self._thread.start()
        return self

    def _run(self) -> None:
        import ray

        paths = [self._archive.path_of(i) for i in self._ids]
        try:
            while not self._stop.is_set():
                ds = ray.data.read_parquet(paths, filesystem=self._archive.filesystem)
                blocks = ds.iter_batches(batch_format="pyarrow", batch_size=None)
                for episode in episodes_from_blocks(blocks, self._spec.pixels_shape):
                    if self._stop.is_set():
                        return
                    self._adder.add_episode(episode)
                    self.num_episodes += 1
        except BaseException as e:  # surfaced by stop()
            self._error = e
            log.exception("archive stream failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._error is not None:
            raise RuntimeError("streaming the archive failed") from self._error


def evaluate(policy: Policy, spec: EnvSpec, task: str, env: EnvConfig,
             num_episodes: int, seed: int) -> list[float]:
    envs = [env.make(task, seed + i) for i in range(min(num_episodes, 4))]
    ctx = EpisodeContext("offline", 0, "eval", task, spec.task_names.index(task), "eval")
    seeds = [10_000 + seed * 1000 + i for i in range(num_episodes)]
    return [e.episode_return for e in EnvironmentLoop(envs, spec).run(policy, seeds, ctx, True)]


class Progress:
    """Progress lines: updates, rate, elapsed time, ETA and the mean losses."""

    KEYS = ("loss", "l_imp", "l_bc", "l_q", "temperature", "entropy")

    def __init__(self, total: int):
        self.total, self.t0 = total, time.perf_counter()

    def line(self, done: int, metrics: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = done / max(elapsed, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        terms = " ".join(f"{k} {metrics[k]:.3f}" for k in self.KEYS if k in metrics)
        return (f"updates {done}/{self.total}  {rate:.1f}/s  elapsed {elapsed:.0f}s  "
                f"ETA {eta:.0f}s  {terms}")


def train_in_chunks(learner: PACLearner, steps: int, chunk: int,
                    after_chunk: Callable[[int, dict[str, float]], None]) -> dict[str, float]:
    """Runs `steps` updates, calling `after_chunk(updates_so_far, chunk_metrics)` every `chunk`
    updates and at the end; returns the metrics averaged over all `steps` updates."""
    done, totals = 0, {}
    while done < steps:
        n = min(chunk, steps - done)
        metrics = learner.run(n)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * n
        done += n
        after_chunk(done, metrics)
    return {k: v / max(steps, 1) for k, v in totals.items()}


def evaluate_by_task(policy: Policy, spec: EnvSpec, config: ExperimentConfig,
                      seed: int) -> dict[str, list[float]]:
    """Greedy returns of `policy` on every simulator task (loop.eval_episodes each, fixed
    seeds); robot tasks have no simulator here."""
    return {task: evaluate(policy, spec, task, config.env, config.loop.eval_episodes, seed)
            for task in config.env.tasks if not is_robot_task(task)}


def combine(selections: Sequence[Selection]) -> Selection:
    """Several archives' selections as one training set (ids sorted, each named once)."""
    first = {i: r for s in reversed(selections) for i, r in zip(s.episode_ids, s.returns)}
    pairs = sorted(first.items())  # an id in several: the first archive's return
    ids = [i for i, _ in pairs]
    return Selection(ids, np.asarray([r for _, r in pairs], np.float64),
                     hashlib.sha256("\n".join(ids).encode()).hexdigest())


def _learner_policy(learner: PACLearner, spec: EnvSpec, config: ExperimentConfig,
                    seed: int) -> PACPolicy:
    snapshot = Snapshot.from_state_dict(1, learner.get_variables(), snapshot_metadata(
        spec.to_dict(), config.model, 0, learner.num_steps, 0))
    return PACPolicy.from_snapshot(snapshot, seed)


def train_offline(config: ExperimentConfig, archive_uri: str | Sequence[str], run_dir: Path,
                  steps: int,
                  where: str | None = None, seed: int = 0, stream: bool = False,
                  log_every: int = 500, eval_every: int = 0,
                  out: Callable[[str], None] = print) -> dict:
    """Loads (or streams), trains, evaluates, snapshots; returns the summary also written to
    result.json.

    Every `log_every` updates a progress line goes to `out`; with `eval_every` > 0 the policy is
    also evaluated greedily every `eval_every` updates, and `result["curve"]` holds the points.
    Several archive URIs train on all of them (an episode id found in two is used once), and
    the snapshot's `trained_on` lists each with its manifest hash and episode count.
    """
    if all(is_robot_task(t) for t in config.env.tasks):
        eval_every = 0  # nothing to evaluate here: robot tasks have no simulator
    t0 = time.time()
    for sub in ("checkpoints", "policies", "replay_checkpoints", "report"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    uris = [archive_uri] if isinstance(archive_uri, (str, Path)) else list(archive_uri)
    if stream and len(uris) > 1:
        raise FilterError("--stream reads one archive; give --archive once")
    archives = [EpisodeArchive(u) for u in uris]
    selections = [select_episodes(a, where) for a in archives]
    selection, archive = combine(selections), archives[0]
    if not selection.episode_ids:
        raise FilterError(f"no collected episodes in {', '.join(map(str, uris))} match "
                          f"{where!r}")
    spec = config.env.spec()
    server = ReplayServer(spec, config.replay, run_dir / "replay_checkpoints")
    feeder, added = None, set()  # added: ids loaded (an id in two archives: the first's copy)
    try:
        adder = ReverbSequenceAdder(server.address, config.replay)
        if stream:
            feeder = StreamFeeder(archive, selection.episode_ids, spec, adder).start()
        else:
            for source, chosen in zip(archives, selections):
                for episode_id in chosen.episode_ids:
                    if episode_id not in added:
                        adder.add_episode(source.read(source.path_of(episode_id)))
                        added.add(episode_id)
        batches = ReverbBatchIterator(server.address, config.replay, config.learner.batch_size)
        learner = PACLearner(spec, config.model, config.learner, batches, seed=seed)
        progress, curve, last_eval = Progress(steps), [], {}

        def after_chunk(done: int, chunk_metrics: dict[str, float]) -> None:
            line = progress.line(done, chunk_metrics)
            evaluated = eval_every and (done % eval_every == 0 or done == steps)
            if evaluated:
                by_task = evaluate_by_task(_learner_policy(learner, spec, config, seed), spec,
                                            config, seed)
                last_eval[done] = by_task
                returns = [r for task_returns in by_task.values() for r in task_returns]
                curve.append({"updates": done, "seconds": time.time() - t0,
                              "eval_mean": float(np.mean(returns))})
                line += f"  eval {curve[-1]['eval_mean']:.1f}"
            if evaluated or done % log_every == 0 or done == steps:
                out(line)

        chunk = math.gcd(log_every, eval_every) if eval_every else log_every
        metrics = train_in_chunks(learner, steps, chunk, after_chunk)
        # The sampling thread must end (and drop its Reverb dataset) before the server stops:
        # a sampler alive at the in-process server's shutdown aborts the process (SIGABRT).
        batches.close(wait_seconds=60)
        table_items = server.num_items()
    finally:
        if feeder is not None:
            feeder.stop()
        server.stop()
    save_checkpoint(learner.state(), run_dir / "checkpoints", step=learner.num_steps, cycle=0)
    returns = selection.returns
    data = {"archive": ", ".join(map(str, uris)), "manifest_sha256": selection.manifest_hash,
            "episodes": len(selection.episode_ids), "filter": where or "",
            "archives": [{"archive": str(u), "manifest_sha256": s.manifest_hash,
                          "episodes": len(s.episode_ids)} for u, s in zip(uris, selections)],
            "streamed": stream, "episodes_streamed": feeder.num_episodes if feeder else 0,
            "episodes_loaded": len(added),
            "table_items_at_end": table_items}
    snapshot = Snapshot.from_state_dict(1, learner.get_variables(), snapshot_metadata(
        spec.to_dict(), config.model, 0, learner.num_steps, 0, trained_on=data))
    save_snapshot(snapshot, run_dir / "policies")
    # The curve's last point evaluated these very weights with the same seeds: reuse it.
    eval_by_task = last_eval.get(steps) or evaluate_by_task(
        PACPolicy.from_snapshot(snapshot, seed), spec, config, seed)
    eval_returns = [r for returns in eval_by_task.values() for r in returns]  # [] for robots
    result = {"data": {**data, "mean_return": float(returns.mean()),
                       "best_return": float(returns.max())},
              "learner": {k: float(v) for k, v in metrics.items()}, "steps": steps,
              "seed": seed, "alpha": config.learner.alpha, "beta": config.learner.beta,
              "eval_returns": eval_returns,
              "eval_mean": float(np.mean(eval_returns)) if eval_returns else None,
              "eval_by_task": {t: float(np.mean(r)) for t, r in eval_by_task.items()},
              "curve": curve,
              "seconds": time.time() - t0, "config": config_to_dict(config)}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result

