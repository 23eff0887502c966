"""The collect-and-infer driver: starts the run's Ray actors and runs the cycles.

    cycle k:  actors collect E episodes with policy v_k (pushed by the policy server); replay
              checkpoints
              learner trains S steps on everything in replay, then checkpoints
              actors evaluate the candidate v_{k+1} greedily on M episodes
              learner publishes v_{k+1}
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import ray
from prometheus_client import CollectorRegistry

from actors.robot_spec import is_robot_task
from cluster.config import ExperimentConfig, LoopMode
from cluster.preflight import (check_init_from, check_placement, check_run_dir,
                               check_storage_reaches_every_node, placement_warnings,
                               prepare_run_dir, run_credentials)
from cluster.report import CycleRow, format_header, format_row, plot_returns, read_state, \
    write_state
from cluster.discovery import clear_targets
from cluster.metrics import RunMetrics
from cluster.process import advertised_host, serve_metrics
from cluster.progress import CycleProgress, RunView
from cluster.robots import wait_for_robots
from cluster.topology import Topology, restart_counts, split, wait
from replay.storage import Storage

log = logging.getLogger(__name__)


RELAY_LOG_SECONDS = 30.0  # how long a cycle's end waits for the relays' logs to be shipped
RELAY_START_SECONDS = 120.0  # how long a cycle's end waits for a new node's relay to start


def run_cycle(top: Topology, config: ExperimentConfig, cycle: int, version: int,
              learner_steps: int, evaluate: bool = True,
              out: Callable[[str], None] = print, view: RunView | None = None) -> dict:
    """One collect -> train -> [evaluate] -> publish round; returns what the row needs.
    `learner_steps` is the learner's total before the cycle. Robot episodes are waited for
    while the sim actors collect (cluster/robots.py). `view` shows each phase as it starts."""
    n, timeout, loop = len(top.actors), config.loop.call_timeout_seconds, config.loop
    enter = view.enter if view is not None else lambda *a: None
    shares = split(loop.episodes(cycle), n) if n else []
    enter(cycle, "collect", {f"actor-{i}": e for i, e in enumerate(shares) if e})
    calls = [(f"actor-{i}", a.collect.remote(e, cycle, version, loop.version_timeout_seconds))
             for i, (a, e) in enumerate(zip(top.actors, shares)) if e]
    robots = wait_for_robots(
        lambda v: wait([("policyserver", top.policy.fleet_progress.remote(v))], "fleet",
                       timeout)[0],
        top.run, cycle, version, loop.robot_episodes_per_cycle, loop.robot_timeout_seconds,
        loop.robot_on_timeout, out) if loop.robot_episodes_per_cycle else {}
    collected = wait(calls, "collect", timeout)
    # Replay checkpoints once its cycle's data is in: a replay server that dies later in the
    # cycle restarts from this checkpoint without losing any of it.
    wait([("replay", top.replay.checkpoint.remote())], "checkpoint", timeout)
    target = learner_steps + config.loop.learner_steps_per_cycle
    enter(cycle, "train", {"learner": config.loop.learner_steps_per_cycle})
    (train,) = wait([("learner", top.learner.train.remote(target, cycle))], "train", timeout)
    candidate = top.learner.make_snapshot.remote(version + 1, cycle)  # an ObjectRef, put once
    eval_shares = split(config.loop.eval_episodes, n) if n and evaluate else []
    enter(cycle, "evaluate", {f"actor-{i}": m for i, m in enumerate(eval_shares) if m})
    evaluated = wait([(f"actor-{i}", a.evaluate.remote(candidate, m, cycle))
                      for i, (a, m) in enumerate(zip(top.actors,
                                                     split(config.loop.eval_episodes, n)))
                      if m and evaluate], "evaluate", timeout) if n else []
    enter(cycle, "publish")
    (new_version,) = wait([("learner", top.learner.publish.remote(
        top.policy_address(timeout), version + 1, cycle))], "publish", timeout)
    episodes = [e for r in collected for e in r["episodes"]]
    return {"episodes": episodes, "collected": collected, "robots": robots,
            "eval": [e for r in evaluated for e in r["episodes"]], "train": train,
            "version": new_version}


class RunRecord:
    """What a run records: a CycleRow per published version, the last eval per task, the busy
    fraction of actors and learner, the staleness of collected steps -> cycle.json and the
    report after every row."""

    def __init__(self, top: Topology, config: ExperimentConfig, run: str, rows: list[CycleRow],
                 out: TextIO):
        self.top, self.config, self.run, self.rows, self.out = top, config, run, rows, out
        state = read_state(run) if rows else {}
        self.last_eval: dict[str, float] = state.get("eval_by_task", {})
        self.extra: dict = {k: state[k] for k in ("collect_rounds", "fleet_seen") if k in state}
        self.env_steps = rows[-1].env_steps if rows else 0
        self.episodes = rows[-1].episodes if rows else 0
        # Seconds inside collect calls, and inside train calls not waiting for data.
        self.busy = {"actors": 0.0, "learner": 0.0}
        # Staleness of every collected step (versions behind the newest): sum, steps, max.
        self.stale_sum, self.stale_steps, self.stale_max = 0.0, 0, 0
        self.started = time.time()
        self.view: RunView | None = None  # the run's metrics and live progress

    def say(self, text: str) -> None:
        """A line of the run's output (above the live progress on a terminal)."""
        if self.view is not None:
            self.view.say(text)
        else:
            print(text, file=self.out, flush=True)

    @property
    def learner_steps(self) -> int:
        return self.rows[-1].learner_steps if self.rows else 0

    def collected(self, result: dict) -> None:
        """A collect call's result: counts its steps, episodes, busy time and staleness."""
        self.env_steps += result["env_steps"]
        self.episodes += len(result["episodes"])
        self.busy["actors"] += result["seconds"]
        for e in result["episodes"]:
            self.stale_sum += e["staleness"] * e["length"]
            self.stale_steps += e["length"]
            self.stale_max = max(self.stale_max, e["staleness_max"])

    def learner_busy(self, train: dict) -> None:
        """A train call's result: its seconds, less those spent waiting for data."""
        self.busy["learner"] += train["seconds"] - train.get("data_wait_seconds", 0.0)

    def evaluated(self, episodes: list[dict]) -> float | None:
        by_task = {t: float(np.mean([e["return"] for e in episodes if e["task"] == t]))
                   for t in sorted({e["task"] for e in episodes})}
        if by_task:
            self.last_eval = by_task
        return float(np.mean([e["return"] for e in episodes])) if episodes else None

    def add_row(self, row: CycleRow, train: dict, wait_for_logs: bool = True) -> None:
        if self.view is not None:
            metrics = self.view.metrics
            metrics.env_steps.inc(row.env_steps - (self.rows[-1].env_steps if self.rows else 0))
            if row.eval_return is not None:
                metrics.eval_return.set(row.eval_return)
        self.rows.append(row)
        self.say(format_row(row))
        self.save(train, wait_for_logs)

    def attach_eval(self, version: int, episodes: list[dict]) -> None:
        """An evaluation that finished after its version's row (async): fills that row in."""
        value = self.evaluated(episodes)
        if self.view is not None and value is not None:
            self.view.metrics.eval_return.set(value)
        for i, row in enumerate(self.rows):
            if row.policy_version == version:
                self.rows[i] = dataclasses.replace(row, eval_return=value)
        self.say(f"  version {version} evaluated: {value:.1f} (mean of {len(episodes)} greedy "
                 "episodes)")

    def save(self, train: dict, wait_for_logs: bool = True) -> None:
        """cycle.json, the report, and every process's log, into run storage; first, relays
        for the nodes there are now."""
        self.top.refresh_relays(min(self.config.loop.call_timeout_seconds, RELAY_START_SECONDS))
        wall = max(time.time() - self.started, 1e-9)
        n = len(self.top.actors)
        version = self.rows[-1].policy_version if self.rows else 0
        (replay,) = wait([("replay", self.top.replay.rate_stats.remote())], "rate_stats",
                         self.config.loop.call_timeout_seconds)
        write_state(self.run, self.rows, {
            "replay": replay,
            "policy_version": version, "eval_by_task": self.last_eval,
            "addresses": self.top.addresses, "restarts": restart_counts(self.run),
            "busy_fraction": {"actors": self.busy["actors"] / (wall * max(n, 1)),
                              "learner": self.busy["learner"] / wall},
            "mode": self.config.loop.mode.value,
            "staleness": {"mean": self.stale_sum / max(self.stale_steps, 1),
                          "max": self.stale_max},
            "last_train_metrics": train, **self.extra})
        plot_returns(self.rows, self.run, ", ".join(self.config.env.tasks))
        shipped = [(name, w.ship_logs.remote()) for name, w in self.top.named()]
        if wait_for_logs:  # else each ships after its call in progress (async: never idle)
            # A relay's log is best effort: one whose node is going away may not answer, and the
            # run does not need it (its node's collectors time out on their own without it).
            relays = [ref for name, ref in shipped if name in self.top.relays.handles]
            wait([(name, ref) for name, ref in shipped if name not in self.top.relays.handles],
                 "ship_logs", self.config.loop.call_timeout_seconds)
            ray.wait(relays, num_returns=len(relays), timeout=RELAY_LOG_SECONDS)


def fleet_totals(top: Topology, timeout: float) -> tuple[int, int]:
    """(episodes, decisions) the run's robots have uploaded, all versions."""
    (progress,) = wait([("policyserver", top.policy.fleet_progress.remote(0))], "fleet",
                       timeout)
    return (sum(p["total"] for p in progress.values()),
            sum(p["total_steps"] for p in progress.values()))


def run_cycles(top: Topology, config: ExperimentConfig, record: RunRecord, version: int,
               started: float) -> None:
    """collect -> train -> [evaluate] -> publish, one row per cycle, until num_cycles or the
    budget."""
    budget, timeout = config.loop.budget_seconds, config.loop.call_timeout_seconds
    say = record.say
    robot_run = any(is_robot_task(t) for t in config.env.tasks)
    if version == 0 and (robot_run or config.learner.init_from):
        # Robots act only with a published policy, and a fine-tuning run collects cycle 0 with
        # its base policy: the learner's initial weights are v1, made "before cycle 0" (cycle
        # -1), so robots record its episodes under cycle 0.
        (version,) = wait([("learner", top.learner.publish.remote(
            top.policy_address(timeout), 1, -1))], "publish", timeout)
        say(f"  published v{version}, the initial policy" + (
            f" ({config.learner.init_from})" if config.learner.init_from else ""))
    # Robot episodes and decisions already in rows (cycle.json keeps them for a resume).
    seen = tuple(record.extra.get("fleet_seen", (0, 0)))
    for cycle in range(len(record.rows), config.loop.num_cycles):
        t0 = time.time()
        previous = record.rows[-1].seconds if record.rows else 0.0
        last = cycle == config.loop.num_cycles - 1 or (
            budget > 0 and t0 - started + 2 * previous > budget)  # the next would not fit
        result = run_cycle(top, config, cycle, version, record.learner_steps,
                           config.loop.evaluates(cycle) or last, say, record.view)
        version = result["version"]
        for collected in result["collected"]:
            record.collected(collected)
        robots = result["robots"].values()
        if robot_run:  # every robot episode accepted since the last row, of any version
            now = fleet_totals(top, timeout)
            record.episodes += now[0] - seen[0]
            record.env_steps += now[1] - seen[1]  # robots: decisions
            seen = record.extra["fleet_seen"] = now
        returns = [e["return"] for e in result["episodes"]]
        count = len(returns) + sum(r["episodes"] for r in robots)
        record.learner_busy(result["train"])
        row = CycleRow(cycle=cycle, env_steps=record.env_steps, episodes=record.episodes,
                       collect_return=(sum(returns) + sum(r["return_sum"] for r in robots)) /
                       count if count else float("nan"),
                       eval_return=record.evaluated(result["eval"]),
                       learner_steps=int(result["train"]["learner_steps"]),
                       policy_version=version, seconds=time.time() - t0)
        record.add_row(row, result["train"])
        if last:
            break


def final_scrape(top: Topology, registry: CollectorRegistry, timeout: float) -> None:
    """Lets Prometheus read every process's final values before the run ends: each endpoint
    that has been scraped waits up to `timeout` s for one more scrape (ScrapeClock)."""
    if timeout <= 0:
        return
    refs = [handle.final_scrape.remote(timeout) for _, handle in top.named()]
    registry.scrape_clock.final_scrape(timeout)
    ray.wait(refs, num_returns=len(refs), timeout=timeout + 5)  # a dead process counts as done


_signalled: list[int] = []  # the termination signals this run's driver received


def _terminated(signum: int, frame) -> None:
    _signalled.append(signum)
    raise SystemExit(128 + signum)


def termination(error: BaseException) -> BaseException:
    """The error a run ends with: after SIGTERM, SystemExit(128 + signal) whatever the handler's
    SystemExit surfaced as (raised while a C extension module initialises, as matplotlib's
    ft2font on a run's first report, it comes out as ImportError and the run exited 1)."""
    if _signalled and not isinstance(error, SystemExit):
        return SystemExit(128 + _signalled[-1])
    return error


def run_experiment(config: ExperimentConfig, run_dir: str | Path, address: str | None = None,
                   out: TextIO = sys.stdout, resume: bool = False,
                   progress: bool = True) -> list[CycleRow]:
    """Runs every cycle not yet done; prints a row per cycle; writes the run's storage (a local
    path or an object-store URI).

    With `resume`, cycles continue after the last row of `cycle.json`; replay, the policy server
    and the learner restore what they stored in the run's storage.
    """
    started = time.time()
    run = Storage(run_dir).uri
    check_run_dir(config, run, resume)
    if not resume:  # a resumed run continues from its own checkpoints
        check_init_from(config)
    credentials = run_credentials(config.cluster)
    # A new local cluster gets Ray's default, token authentication, without Ray's warning line.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    if threading.current_thread() is threading.main_thread():
        # `ray job stop` or a deleted pod (SIGTERM) ends the run like an error, so its cleanup
        # below runs (Ray shut down, metrics targets removed) and --resume continues it.
        # After ray.init, whose own handler would end the process at once.
        _signalled.clear()
        signal.signal(signal.SIGTERM, _terminated)
    view, top = None, None
    try:
        check_storage_reaches_every_node(run)
        check_placement(config.cluster, config.loop.mode)
        for warning in placement_warnings(config.cluster):
            log.warning("%s", warning)
        rows = prepare_run_dir(config, run, resume)
        registry = serve_metrics(run, "driver", advertised_host(config.cluster))
        metrics = RunMetrics(registry)
        if rows:
            metrics.env_steps.inc(rows[-1].env_steps)
        view = RunView(metrics, CycleProgress(run, out) if progress else None, out)
        top = Topology(config, run, credentials)
        print(format_header(), file=out, flush=True)
        for row in rows:
            print(format_row(row), file=out, flush=True)
        (version,) = wait([("policyserver", top.policy.latest_version.remote())], "start-up",
                          config.loop.call_timeout_seconds)
        record = RunRecord(top, config, run, rows, out)
        record.view = view
        if config.loop.mode is LoopMode.ASYNC:
            from cluster.async_loop import run_async  # it imports this module

            run_async(top, config, record, version, started)
        else:
            run_cycles(top, config, record, version, started)
        final_scrape(top, registry, config.cluster.final_scrape_seconds)
    except BaseException as e:
        error = termination(e)
        if error is not e:
            raise error from e
        raise
    finally:
        if view is not None:
            view.close()
        ray.shutdown()
        try:  # this run's processes are gone: nothing is left to scrape
            if top is not None:  # (a run refused before it started leaves a live one's)
                clear_targets(run)
        except OSError:  # storage unreachable: the error that ended the run says more
            pass
    return rows
