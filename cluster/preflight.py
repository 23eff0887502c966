"""What `pacflow run` checks before it starts anything: the run's storage (reachable, not a
finished run unless resumed, the same config when resumed), placement (resources and CPUs the
Ray cluster has), and the policy credentials. Each problem is a RunDirError: one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ray
import yaml

from cluster.config import (ClusterConfig, ConfigError, ExperimentConfig, LoopMode,
                            config_from_dict, config_to_dict)
from cluster.report import STATE, CycleRow, read_rows
from policies.security import SecurityError, pack_client_security
from policies.snapshot import read_snapshot_metadata
from replay.storage import Storage, StorageError, join

RUN_SUBDIRS = ("archive", "quarantine", "checkpoints", "policies", "replay_checkpoints",
               "metrics/targets", "report", "logs")
CONFIG = "config.yaml"  # the resolved config, in run storage
ENV_SPEC = "env_spec.json"  # the tasks as the run started (robot specs resolved), for --resume


class RunDirError(ValueError):
    """The run cannot start as asked: its storage (unreachable, exists without --resume, or
    differs) or its placement (a resource no node has). One line, exit code 2."""


def check_run_dir(config: ExperimentConfig, run: str, resume: bool) -> list[CycleRow]:
    """Checks that an object store can be written, that a new run does not overwrite one, and
    that a resumed one has the same config; writes nothing; returns the cycles already done."""
    store = Storage(run)
    if not store.local:
        try:
            store.check_writable()
        except StorageError as e:
            raise RunDirError(f"--run-dir: {e}") from None
    if not resume and store.exists(STATE):
        raise RunDirError(f"{run} already holds a run; pass --resume to continue it")
    rows = read_rows(run) if resume and store.exists(STATE) else []
    if resume and store.exists(CONFIG):
        def without_num_cycles(d: dict) -> dict:  # the fields a resume may change
            return {**d, "loop": {k: v for k, v in d["loop"].items()
                                  if k not in ("num_cycles", "budget_seconds")}}

        stored = join(store.uri, CONFIG)
        # Through the parser, so fields added since the run started compare as their defaults.
        try:
            before = config_to_dict(config_from_dict(yaml.safe_load(store.get_bytes(CONFIG))))
        except ConfigError as e:  # e.g. a field that this pacflow no longer has
            raise RunDirError(f"--resume: {stored} no longer parses: {e}") from None
        if without_num_cycles(config_to_dict(config)) != without_num_cycles(before):
            raise RunDirError(f"--resume: the config differs from {stored} in more than "
                              "loop.num_cycles and loop.budget_seconds")
    if resume and store.exists(ENV_SPEC):  # robot spec files live outside the run
        ours = json.loads(json.dumps(config.env.spec().to_dict()))
        if json.loads(store.get_bytes(ENV_SPEC)) != ours:
            raise RunDirError(f"--resume: env.tasks describe other tasks than when the run "
                              f"started ({join(store.uri, ENV_SPEC)}); a robot spec file "
                              "changed?")
    return rows


def check_init_from(config: ExperimentConfig) -> None:
    """`learner.init_from` must be a readable snapshot of the same tasks and network."""
    path = config.learner.init_from
    if not path:
        return
    try:
        stored = read_snapshot_metadata(path)["metadata"]
    except (OSError, KeyError, ValueError) as e:
        raise RunDirError(f"learner.init_from: cannot read snapshot {path} ({e})") from None

    def plain(d: dict) -> dict:  # as JSON holds it: tuples are lists
        return json.loads(json.dumps(d))

    for field, ours in (("env_spec", config.env.spec().to_dict()),
                        ("model_config", dataclasses.asdict(config.model))):
        theirs, ours = stored.get(field, {}), plain(ours)
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RunDirError(f"learner.init_from: snapshot {path} has another {field} "
                              f"(differs in {', '.join(differ)})")


def prepare_run_dir(config: ExperimentConfig, run: str, resume: bool) -> list[CycleRow]:
    """Checks the run (check_run_dir), then creates it or updates a resumed one's config;
    returns the cycles already done."""
    rows = check_run_dir(config, run, resume)
    store = Storage(run)
    if store.local:  # an object store has no empty folders
        for sub in RUN_SUBDIRS:
            (Path(store.root) / sub).mkdir(parents=True, exist_ok=True)
    store.put_bytes(CONFIG, yaml.safe_dump(config_to_dict(config), sort_keys=False).encode())
    store.put_bytes(ENV_SPEC, json.dumps(config.env.spec().to_dict(), indent=1).encode())
    return rows


def check_storage_reaches_every_node(run: str) -> None:
    """A plain local path on a multi-node cluster would scatter the run over node disks."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) > 1 and "://" not in run:
        raise RunDirError(
            f"--run-dir: {run} is a local path but the Ray cluster has {len(nodes)} nodes, so "
            "each would write its own part of the run; use an object-store URI (s3://, gs://) "
            "or, for a filesystem mounted on every node, file://" + run)


def check_placement(config: ClusterConfig, mode: LoopMode = LoopMode.CYCLES) -> None:
    """Refuses custom resources that no node of the cluster has, and more CPUs than the cluster
    has in all (Ray would wait forever)."""
    have = ray.cluster_resources()
    for field in ("server_resource", "actor_resource", "learner_resource"):
        name = getattr(config, field)
        if name and name not in have:
            raise RunDirError(f"cluster.{field}: no node of the Ray cluster has resource "
                              f"{name!r} (it has: {', '.join(sorted(have))})")
    asked = config.num_actors * config.actor_cpus + config.learner_cpus * (
        config.learner_workers if config.learner_workers > 1 else 1) + (
        config.evaluator_cpus if mode is LoopMode.ASYNC else 0.0)
    if asked > have.get("CPU", 0.0) + 1e-9:
        fields = "num_actors * actor_cpus + learner_cpus" + (
            " + evaluator_cpus" if mode is LoopMode.ASYNC else "")
        raise RunDirError(f"cluster: the run reserves {asked:g} CPUs ({fields}) but the Ray "
                          f"cluster has {have.get('CPU', 0.0):g}")


def placement_warnings(config: ClusterConfig) -> list[str]:
    """Placements that run but share cores they do not reserve: one line each."""
    warnings = []
    if config.env_processes and config.actor_cpus < config.env_processes + 1:
        warnings.append(
            f"cluster.env_processes={config.env_processes} gives each collector "
            f"{config.env_processes} env process(es) beside it, but cluster.actor_cpus="
            f"{config.actor_cpus:g} reserves CPUs for fewer; Ray may give the cores they use to "
            f"other processes: set cluster.actor_cpus={config.env_processes + 1}")
    return warnings


def run_credentials(cluster: ClusterConfig) -> dict[str, dict[str, bytes]]:
    """The learner's and the actors' policy credentials, read here into memory. Each process
    gets its own as bytes, never the folder's path: the folder (every client's key and token)
    need only be readable where the driver and the policy server run. An unreadable file is a
    RunDirError naming it."""
    try:
        return {who: pack_client_security(cluster.policy_client_security(who))
                for who in ("learner", "actor")}
    except SecurityError as e:
        raise RunDirError(f"cluster.policy_credentials: {e}") from None
