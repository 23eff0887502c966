"""The asynchronous loop (`loop.mode: async`): actors collect while the learner trains.

    actors:    collect -> collect -> ...   each call episodes_per_cycle / N episodes, written to
                                           archive and replay wave by wave; a newly pushed
                                           version is taken at the next episode boundary
    learner:   train publish_every updates -> publish v+1 -> train -> ...
    replay:    the sample_to_insert rate limiter blocks whichever side runs ahead, which holds
               the learner's samples per inserted item at replay.samples_per_insert
    evaluator: every eval_every versions, greedy episodes with the newest pushed version

It shares the driver's vocabulary (driver.py): the same Topology, RunRecord, one CycleRow per
published version, `wait` for every result. A budget (loop.max_env_steps, max_learner_steps,
budget_seconds, or num_cycles versions) stops new work; collect calls in flight finish while the
learner keeps sampling (so the rate limiter does not hold their inserts back); then the learner
is stopped mid-chunk, and the last version is published and evaluated.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import ray

from cluster.config import ExperimentConfig
from cluster.driver import RunRecord
from cluster.topology import RunFailed, Topology, split, wait
from cluster.report import CycleRow


@dataclasses.dataclass
class _Call:
    kind: str  # "collect", "train", "eval" or "checkpoint"
    name: str  # the process, for errors
    index: int  # the actor's index, or the evaluated version
    started: float  # time.monotonic()


class AsyncLoop:
    """Keeps every actor, the learner and the evaluator busy until a budget is reached."""

    def __init__(self, top: Topology, config: ExperimentConfig, record: RunRecord,
                 version: int, started: float):
        self.top, self.config, self.record, self.version = top, config, record, version
        self.loop, self.started = config.loop, started
        self.per_actor = split(self.loop.episodes_per_cycle, len(top.actors))
        # The "cycle" of each actor's next collect call: episode ids and seeds continue from it
        # on resume, so a resumed run neither repeats nor skips an id.
        self.rounds: list[int] = record.extra.setdefault("collect_rounds", [0] * len(top.actors))
        self.pending: dict[ray.ObjectRef, _Call] = {}
        self.since_row: list[dict] = []  # episodes collected since the last row
        self.last_return = 0.0  # mean return of the newest collect call
        self.row_started = time.time()
        self.longest = {"collect": 0.0, "eval": 0.0}  # seconds, to end within budget_seconds
        self.stopping = self.stop_sent = False
        self.train_metrics: dict = {}
        self.learner_steps = record.learner_steps  # after the newest finished train call
        self.next_version = version  # the version the newest train call snapshots

    # -- starting work -------------------------------------------------------------------------
    def _start(self, kind: str, name: str, index: int, ref: ray.ObjectRef) -> None:
        self.pending[ref] = _Call(kind, name, index, time.monotonic())

    def _collect(self, i: int) -> None:
        if not self.per_actor[i]:
            return
        ref = self.top.actors[i].collect.remote(self.per_actor[i], self.rounds[i], 0,
                                                self.loop.version_timeout_seconds)
        self.rounds[i] += 1
        self._start("collect", f"actor-{i}", i, ref)

    def _train(self) -> None:
        """The next chunk of updates; it ends with a snapshot of the next version."""
        self.next_version += 1
        target = self.learner_steps + self.loop.updates_per_version()
        if self.record.view is not None:  # actors collect meanwhile: the learner's progress
            self.record.view.enter(len(self.record.rows), "train",
                                   {"learner": self.loop.updates_per_version()})
        self._start("train", "learner", self.next_version, self.top.learner.train.remote(
            target, len(self.record.rows), self.next_version))

    def _evaluate(self, version: int) -> None:
        self._start("eval", "evaluator", version, self.top.evaluator.evaluate_published.remote(
            version, self.loop.eval_episodes, self.loop.version_timeout_seconds))

    def _busy(self, kind: str) -> bool:
        return any(c.kind == kind for c in self.pending.values())

    def _budget_reached(self) -> bool:
        loop, record = self.loop, self.record
        spare = self.longest["collect"] + self.longest["eval"]  # the drain and the last eval
        return bool((loop.max_env_steps and record.env_steps >= loop.max_env_steps)
                    or (loop.max_learner_steps and record.learner_steps
                        >= loop.max_learner_steps)
                    or (loop.budget_seconds
                        and time.time() - self.started + spare >= loop.budget_seconds)
                    or len(record.rows) >= loop.num_cycles)

    # -- finished work -------------------------------------------------------------------------
    def _collected(self, call: _Call, result: dict) -> None:
        self.record.collected(result)
        self.since_row += result["episodes"]
        if result["episodes"]:
            self.last_return = float(np.mean([e["return"] for e in result["episodes"]]))
        self.longest["collect"] = max(self.longest["collect"], result["seconds"])
        if not self.stopping:
            self._collect(call.index)

    def _trained(self, result: dict) -> None:
        self.record.learner_busy(result)
        self.train_metrics = {k: v for k, v in result.items() if k != "seconds"} or \
            self.train_metrics
        self.learner_steps = result["learner_steps"]
        if not result["snapshot"]:  # stopped before its first update: its version is unused
            self.next_version -= 1
        if not self.stopping or self._busy("collect"):  # in-flight inserts need a sampler
            self._train()  # trains while this version is published and recorded
        if result["snapshot"]:
            self._publish(result["snapshot"])

    def _publish(self, version: int) -> None:
        record, timeout = self.record, self.loop.call_timeout_seconds
        (self.version,) = wait([("learner", self.top.learner.publish.remote(
            self.top.policy_address(timeout), version, len(record.rows)))], "publish", timeout)
        episodes = self.since_row
        row = CycleRow(cycle=len(record.rows), env_steps=record.env_steps,
                       episodes=record.episodes,
                       collect_return=float(np.mean([e["return"] for e in episodes]))
                       if episodes else self.last_return,
                       eval_return=None, learner_steps=self.train_metrics["learner_steps"],
                       policy_version=self.version, seconds=time.time() - self.row_started)
        self.since_row, self.row_started = [], time.time()
        record.add_row(row, self.train_metrics, wait_for_logs=False)
        if (row.cycle + 1) % self.loop.eval_every == 0 and not self._busy("eval") \
                and not self.stopping:
            self._evaluate(self.version)
            if not self._busy("checkpoint"):
                # Not waited for here: it waits for an episode write in progress, which the
                # rate limiter may hold until the learner samples again, and only this loop
                # starts the learner's next train call.
                self.pending[self.top.replay.checkpoint.remote()] = _Call(
                    "checkpoint", "replay", 0, time.monotonic())

    def _evaluated(self, result: dict) -> None:
        self.longest["eval"] = max(self.longest["eval"], result["seconds"])
        self.record.attach_eval(result["version"], result["episodes"])

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        for i in range(len(self.top.actors)):
            self._collect(i)
        self._train()
        timeout = self.loop.call_timeout_seconds
        while self.pending:
            if not self.stopping and self._budget_reached():
                self.stopping = True
            if self.stopping and not self._busy("collect") and not self.stop_sent:
                self.top.learner.stop.remote()  # its second thread ends the chunk in progress
                self.stop_sent = True
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            now = time.monotonic()
            for ref, call in self.pending.items():
                if ref not in ready and now - call.started > timeout:
                    raise RunFailed(f"{call.name}: {call.kind} did not finish within "
                                    f"{timeout:.0f} s (loop.call_timeout_seconds)")
            for ref in ready:
                call = self.pending.pop(ref)
                (result,) = wait([(call.name, ref)], call.kind, timeout)
                {"collect": self._collected, "train": lambda _, r: self._trained(r),
                 "eval": lambda _, r: self._evaluated(r),
                 "checkpoint": lambda *_: None}[call.kind](call, result)
        self._finish()

    def _finish(self) -> None:
        """Evaluates the last version if no evaluation has, checkpoints replay, saves."""
        record, timeout = self.record, self.loop.call_timeout_seconds
        if record.rows and record.rows[-1].eval_return is None:
            (result,) = wait([("evaluator", self.top.evaluator.evaluate_published.remote(
                self.version, self.loop.eval_episodes, self.loop.version_timeout_seconds))],
                "evaluate", timeout)
            self._evaluated(result)
        wait([("replay", self.top.replay.checkpoint.remote())], "checkpoint", timeout)
        record.save(self.train_metrics)


def run_async(top: Topology, config: ExperimentConfig, record: RunRecord, version: int,
              started: float) -> None:
    """Collects and trains at once until a budget; one row per published version."""
    AsyncLoop(top, config, record, version, started).run()
