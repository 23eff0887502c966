"""The collect-and-infer driver: starts the run's Ray actors and runs the cycles.

    cycle k:  actors collect E episodes with policy v_k (pushed by the policy server)
              learner trains S steps on everything in replay
              actors evaluate the candidate v_{k+1} greedily on M episodes
              learner publishes v_{k+1}; learner and replay checkpoint
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import ray
import yaml

from cluster.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from cluster.report import (CycleRow, format_header, format_row, plot_returns, read_rows,
                            read_state, write_state)
from cluster.workers import CollectorWorker, LearnerWorker, PolicyServerWorker, ReplayWorker

log = logging.getLogger(__name__)
RUN_SUBDIRS = ("archive", "quarantine", "checkpoints", "policies", "replay_checkpoints",
               "metrics/targets", "report", "logs")


def split(total: int, parts: int) -> list[int]:
    """Splits `total` as evenly as possible: split(5, 2) == [3, 2]."""
    return [total // parts + (i < total % parts) for i in range(parts)]


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume, or differs)."""


def prepare_run_dir(config: ExperimentConfig, run_dir: Path, resume: bool) -> list[CycleRow]:
    """Creates the run directory, or checks a resumed one; returns the cycles already done."""
    stored = run_dir / "config.yaml"
    if not resume and (run_dir / "cycle.json").exists():
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it")
    rows = read_rows(run_dir) if resume and (run_dir / "cycle.json").exists() else []
    if resume and stored.exists():
        def without_num_cycles(d: dict) -> dict:  # the fields a resume may change
            return {**d, "loop": {k: v for k, v in d["loop"].items()
                                  if k not in ("num_cycles", "budget_seconds")}}

        # Through the parser, so fields added since the run started compare as their defaults.
        try:
            before = config_to_dict(config_from_dict(yaml.safe_load(stored.read_text())))
        except ConfigError as e:  # e.g. a field that this pacflow no longer has
            raise RunDirError(f"--resume: {stored} no longer parses: {e}") from None
        if without_num_cycles(config_to_dict(config)) != without_num_cycles(before):
            raise RunDirError(f"--resume: the config differs from {stored} in more than "
                              "loop.num_cycles and loop.budget_seconds")
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    stored.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return rows


class Topology:
    """The run's Ray actors: one replay server, one policy server, one learner, N collectors."""

    def __init__(self, config: ExperimentConfig, run_dir: Path):
        c, run = config.cluster, str(run_dir)
        spec = config.env.spec()
        self.replay = ray.remote(num_cpus=0)(ReplayWorker).remote(spec, config.replay, run, c.host)
        self.policy = ray.remote(num_cpus=0)(PolicyServerWorker).remote(run, c)
        self.addresses = {"replay": ray.get(self.replay.address.remote()),
                          "policy": ray.get(self.policy.address.remote())}
        local = c.learner_workers == 1  # else the Ray Train workers hold the devices
        self.learner = ray.remote(num_cpus=c.learner_cpus if local else 0,
                                  num_gpus=c.learner_gpus if local else 0)(
            LearnerWorker).remote(spec, config.model, config.learner, config.replay,
                                  self.addresses["replay"], run, config.loop.seed, c)
        self.actors = [
            ray.remote(num_cpus=c.actor_cpus)(CollectorWorker).remote(
                i, spec, config.env, c, config.model, config.replay, self.addresses, run,
                config.loop.seed * 1000 + i * 100)
            for i in range(c.num_actors)]


def run_cycle(top: Topology, config: ExperimentConfig, cycle: int, version: int,
              evaluate: bool = True) -> dict:
    """One collect -> train -> [evaluate] -> publish round; returns what the row needs."""
    n = len(top.actors)
    collected = ray.get([a.collect.remote(e, cycle, version, config.loop.version_timeout_seconds)
                         for a, e in zip(top.actors, split(config.loop.episodes(cycle), n)) if e])
    train = ray.get(top.learner.train.remote(config.loop.learner_steps_per_cycle, cycle))
    candidate = top.learner.make_snapshot.remote(version + 1, cycle)  # an ObjectRef, put once
    evaluated = ray.get([a.evaluate.remote(candidate, m, cycle)
                         for a, m in zip(top.actors, split(config.loop.eval_episodes, n))
                         if m and evaluate])
    new_version = ray.get(top.learner.publish.remote(top.addresses["policy"]))
    ray.get([top.learner.checkpoint.remote(cycle), top.replay.checkpoint.remote()])
    episodes = [e for r in collected for e in r["episodes"]]
    return {"episodes": episodes, "env_steps": sum(r["env_steps"] for r in collected),
            "eval": [e for r in evaluated for e in r["episodes"]], "train": train,
            "version": new_version}


def run_experiment(config: ExperimentConfig, run_dir: Path, address: str | None = None,
                   out: TextIO = sys.stdout, resume: bool = False) -> list[CycleRow]:
    """Runs every cycle not yet done; prints a row per cycle; writes the run directory.

    With `resume`, cycles continue after the last row of `cycle.json`; replay, the policy server
    and the learner restore what they stored in the run directory.
    """
    started = time.time()
    rows = prepare_run_dir(config, run_dir, resume)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        top = Topology(config, run_dir)
        print(format_header(), file=out, flush=True)
        for row in rows:
            print(format_row(row), file=out, flush=True)
        version = ray.get(top.policy.latest_version.remote())
        env_steps = rows[-1].env_steps if rows else 0
        episodes = rows[-1].episodes if rows else 0
        last_eval: dict[str, float] = read_state(run_dir).get("eval_by_task", {}) if rows else {}
        budget = config.loop.budget_seconds
        for cycle in range(len(rows), config.loop.num_cycles):
            t0 = time.time()
            previous = rows[-1].seconds if rows else 0.0
            last = cycle == config.loop.num_cycles - 1 or (
                budget > 0 and t0 - started + 2 * previous > budget)  # the next would not fit
            result = run_cycle(top, config, cycle, version, config.loop.evaluates(cycle) or last)
            version = result["version"]
            env_steps += result["env_steps"]
            episodes += len(result["episodes"])
            row = CycleRow(cycle=cycle, env_steps=env_steps, episodes=episodes,
                           collect_return=float(np.mean([e["return"] for e in result["episodes"]])),
                           eval_return=float(np.mean([e["return"] for e in result["eval"]]))
                           if result["eval"] else None,
                           learner_steps=int(result["train"]["learner_steps"]),
                           policy_version=version, seconds=time.time() - t0)
            rows.append(row)
            print(format_row(row), file=out, flush=True)
            eval_by_task = {t: float(np.mean([e["return"] for e in result["eval"]
                                              if e["task"] == t]))
                            for t in sorted({e["task"] for e in result["eval"]})}
            if eval_by_task:
                last_eval = eval_by_task
            write_state(run_dir, rows, {"policy_version": version, "eval_by_task": last_eval,
                                        "addresses": top.addresses,
                                        "last_train_metrics": result["train"]})
            plot_returns(rows, run_dir / "report" / "returns.png", ", ".join(config.env.tasks))
            if last:
                break
    finally:
        ray.shutdown()
    return rows
