"""ExperimentConfig: one frozen dataclass per component, parsed strictly from YAML.

Unknown keys, missing required fields and wrong types are errors that name the field, e.g.
`learner.batch_size: expected int, got str 'big'`. `--set a.b=v` overrides parse `v` as YAML.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from learners.config import LearnerConfig
from policies.limits import GatewayLimits
from policies.perceiver import PRESETS, PerceiverConfig
from policies.security import ClientSecurity, ServerSecurity, is_loopback
from replay.config import RateLimiter, ReplayConfig

if TYPE_CHECKING:
    from actors.envs import SeededEnvironment
    from replay.spec import EnvSpec


class ConfigError(ValueError):
    """A configuration problem; the message names the field."""


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """What the actors run."""

    tasks: tuple[str, ...]  # e.g. ["dm_control:cartpole-swingup"]; task id i is tasks[i] (required)
    action_repeat: int = 1  # each policy action is applied this many environment steps
    pixels: tuple[int, ...] = ()  # [H, W]: also observe camera images, (H, W, 3) uint8; [] = none
    camera_id: int = 0  # the dm_control camera rendered when pixels is set
    instructions: tuple[str, ...] = ()  # one text per task, read as language tokens; [] = none

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"env.tasks={list(self.tasks)} must be a non-empty list without "
                             "repeats")
        if self.action_repeat < 1:
            raise ValueError(f"env.action_repeat={self.action_repeat} must be >= 1")
        if self.pixels and (len(self.pixels) != 2 or min(self.pixels) < 1):
            raise ValueError(f"env.pixels={list(self.pixels)} must be [height, width] or []")
        if self.instructions and len(self.instructions) != len(self.tasks):
            raise ValueError(f"env.instructions has {len(self.instructions)} entries; give one "
                             f"per task ({len(self.tasks)}) or none")

    @property
    def pixels_shape(self) -> tuple[int, ...]:
        """(H, W, 3) when the actors observe camera images, else ()."""
        return (*self.pixels, 3) if self.pixels else ()

    def spec(self) -> "EnvSpec":
        """The EnvSpec of these environments (builds one of each task)."""
        from actors.envs import make_env_spec

        return make_env_spec(self.tasks, self.action_repeat, self.pixels_shape,
                             self.instructions)

    def make(self, task: str, seed: int) -> "SeededEnvironment":
        """One environment of `task` as configured here."""
        from actors.envs import make_environment

        return make_environment(task, seed, self.action_repeat, self.pixels_shape,
                                self.camera_id)


class RobotTimeout(enum.Enum):
    """What a cycle does once loop.robot_timeout_seconds pass without enough robot episodes."""

    WAIT = "wait"  # say so and wait on, until they arrive or `pacflow fleet continue RUN`
    CONTINUE = "continue"  # train on the robot episodes that arrived


class LoopMode(enum.Enum):
    """How collection and training take turns."""

    CYCLES = "cycles"  # collect, train, evaluate, publish in turn (the default; robots use it)
    ASYNC = "async"  # actors collect while the learner trains (cluster/async_loop.py)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The collect-and-infer loop. In async mode a "cycle" is one published version:
    `learner_steps_per_cycle` updates (or `publish_every`), `episodes_per_cycle` is each round of
    collect calls, and `eval_every` counts versions."""

    num_cycles: int  # collect -> train -> evaluate -> publish rounds (required)
    episodes_per_cycle: int  # collected episodes per cycle, split over the actors (required)
    learner_steps_per_cycle: int  # PAC updates per cycle on all data so far (required)
    eval_episodes: int = 4  # greedy evaluation episodes per evaluated cycle
    eval_every: int = 1  # evaluate every this many cycles (and always the last cycle)
    random_episodes: int = 0  # cycle 0's episodes (uniformly random); 0 = episodes_per_cycle
    seed: int = 0  # base seed for environments, policies and the learner
    # Wall-clock budget of one `pacflow run` invocation: a cycle that would end past it (judged
    # by the previous cycle's time) is not started, and the last cycle run is evaluated. 0 = none.
    budget_seconds: float = 0.0
    version_timeout_seconds: float = 120.0  # max wait for actors to receive a published version
    # Longest the driver waits for any one call (a collect, a train, a checkpoint) before it
    # stops the run with a line naming the process that hung.
    call_timeout_seconds: float = 3600.0
    mode: LoopMode = LoopMode.CYCLES  # "cycles" or "async"
    publish_every: int = 0  # async: updates between published versions; 0 = learner_steps_per_cycle
    max_env_steps: int = 0  # async: no collect call starts past this many env steps; 0 = none
    max_learner_steps: int = 0  # async: no update chunk starts past this many updates; 0 = none
    # Robot runs (env.tasks with robot:<spec> entries): each cycle's collect phase also waits
    # for this many robot episodes acted by the cycle's version (cluster/robots.py); 0 = none.
    robot_episodes_per_cycle: int = 0
    robot_timeout_seconds: float = 0.0  # then loop.robot_on_timeout applies; 0 = wait forever
    robot_on_timeout: RobotTimeout = RobotTimeout.WAIT  # "wait" or "continue"

    def __post_init__(self) -> None:
        for name in ("num_cycles", "episodes_per_cycle", "learner_steps_per_cycle",
                     "eval_episodes", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name}={getattr(self, name)} must be >= 1")
        for name in ("publish_every", "max_env_steps", "max_learner_steps",
                     "robot_episodes_per_cycle", "robot_timeout_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"loop.{name}={getattr(self, name)} must be >= 0")
        if self.budget_seconds < 0:
            raise ValueError(f"loop.budget_seconds={self.budget_seconds} must be >= 0")
        if self.random_episodes < 0:
            raise ValueError(f"loop.random_episodes={self.random_episodes} must be >= 0")

    def episodes(self, cycle: int) -> int:
        """Episodes collected in `cycle`."""
        if cycle == 0 and self.random_episodes:
            return self.random_episodes
        return self.episodes_per_cycle

    def updates_per_version(self) -> int:
        """Updates between published versions (async: publish_every when set)."""
        return self.publish_every or self.learner_steps_per_cycle

    def evaluates(self, cycle: int) -> bool:
        """Whether `cycle` ends with a greedy evaluation."""
        return (cycle + 1) % self.eval_every == 0 or cycle == self.num_cycles - 1


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Ray placement: how many processes of each kind and what they reserve."""

    num_actors: int = 2  # Ray actors that collect episodes
    envs_per_actor: int = 2  # environments each actor steps together (batched inference)
    # Child processes stepping a share of each actor's environments while the actor steps its
    # own (actors/env_group.py), below envs_per_actor; reserve env_processes + 1 actor_cpus.
    # 0: the actor steps them all itself.
    env_processes: int = 0
    actor_cpus: float = 1.0  # Ray CPUs reserved per actor
    learner_cpus: float = 1.0  # Ray CPUs reserved by the learner
    evaluator_cpus: float = 1.0  # async: Ray CPUs reserved by the evaluation actor
    # Added to the collectors' and the evaluator's nice value. Where they share cores with the
    # learner (async mode on a small machine), a positive value leaves the learner its core.
    actor_nice: int = 0
    learner_gpus: float = 0.0  # Ray GPUs per learner process (set 1 on GPU nodes)
    learner_workers: int = 1  # >1: data-parallel learner through Ray Train, batch split evenly
    # Address the replay and policy servers advertise: an IP or name, or "auto" for the IP of
    # the node they run on (multi-node runs; the policy server then needs policy_credentials
    # unless that IP is loopback).
    host: str = "127.0.0.1"
    # Custom Ray resource of the node that hosts replay and the policy server (e.g. "head", as
    # in `ray start --resources '{"head": 1}'`); "" = the driver's node.
    server_resource: str = ""
    actor_resource: str = ""  # custom resource each collector needs a sliver of; "" = any node
    learner_resource: str = ""  # custom resource the learner needs a sliver of; "" = any node
    # Restarts Ray grants each collector and the learner (and Ray Train's max_failures for a
    # data-parallel learner) before the run stops; restarted processes continue from storage.
    max_restarts: int = 3
    replay_port: int = 0  # fixed Reverb port; 0 = a free one
    policy_port: int = 0  # fixed policy server (gRPC) port; 0 = a free one
    # A policy relay (policies/relay.py) on each node other than the policy server's that
    # collectors may run on: it takes each version once and that node's collectors read its
    # files, instead of each collector receiving its own copy over the network.
    policy_relays: bool = True
    # Where runs go when --run-dir is not given: a folder or an object-store URI (s3://, gs://)
    # under which each run gets its own `<time>-<task>` folder. On a multi-node cluster it must
    # be a URI (file:// for a folder every node mounts): node-local folders would scatter a run.
    storage: str = "runs"
    # `pacflow policy gen-certs` directory (or one with the same file names): the policy server
    # runs mTLS + tokens, the learner and actors use its "learner" and "actor" credentials.
    # "" = plaintext, allowed only while `host` is a loopback address.
    policy_credentials: str = ""
    # At a run's end, each metrics endpoint that Prometheus has scraped waits up to this many
    # seconds for one more scrape, so the final counts are stored (0: end at once). Keep it
    # above the scrape interval (deploy/prometheus/prometheus.yml: 5 s).
    final_scrape_seconds: float = 15.0

    def __post_init__(self) -> None:
        if not 0 <= self.actor_nice <= 19:
            raise ValueError(f"cluster.actor_nice={self.actor_nice} must be in [0, 19]")
        if self.num_actors < 0 or self.envs_per_actor < 1 or self.learner_workers < 1:
            raise ValueError("cluster.num_actors must be >= 0 (0: robots only), "
                             "cluster.envs_per_actor and cluster.learner_workers >= 1")
        if not 0 <= self.env_processes < self.envs_per_actor:
            raise ValueError(f"cluster.env_processes={self.env_processes} must be in [0, "
                             f"cluster.envs_per_actor - 1 = {self.envs_per_actor - 1}]")
        if not self.policy_credentials and self.host != "auto" and not is_loopback(self.host):
            raise ValueError(f"cluster.policy_credentials: required when cluster.host "
                             f"({self.host}) is not loopback; make them with `pacflow policy "
                             f"gen-certs DIR --host {self.host}`")

    def policy_server_security(self) -> ServerSecurity:
        if not self.policy_credentials:
            return ServerSecurity(allow_plaintext=True)
        return ServerSecurity.from_dir(self.policy_credentials)

    def policy_client_security(self, identity: str) -> ClientSecurity:
        """`identity` is "learner" or "actor"."""
        if not self.policy_credentials:
            return ClientSecurity()
        return ClientSecurity.from_dir(self.policy_credentials, identity)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run needs; each component receives only its own part."""

    env: EnvConfig
    loop: LoopConfig
    cluster: ClusterConfig = ClusterConfig()
    replay: ReplayConfig = ReplayConfig()
    learner: LearnerConfig = LearnerConfig()
    model: PerceiverConfig = PerceiverConfig()
    gateway: GatewayLimits = GatewayLimits()  # the policy server's bounds (docs/security.md)

    def __post_init__(self) -> None:
        from actors.robot_spec import is_robot_task

        robots = [t for t in self.env.tasks if is_robot_task(t)]
        if self.loop.robot_episodes_per_cycle and not robots:
            raise ValueError("loop.robot_episodes_per_cycle: no robot:<spec> entry in env.tasks")
        if robots and self.loop.mode is LoopMode.ASYNC:
            raise ValueError("loop.mode: robot tasks run in cycles (robots switch policies "
                             "between episodes, a version per cycle)")
        if self.cluster.num_actors == 0 and len(robots) < len(self.env.tasks):
            raise ValueError("cluster.num_actors: 0 leaves the simulator tasks in env.tasks "
                             "with no actor")
        if self.cluster.num_actors == 0 and not self.loop.robot_episodes_per_cycle:
            raise ValueError("loop.robot_episodes_per_cycle: with cluster.num_actors 0 a cycle "
                             "would collect nothing; set how many robot episodes it waits for")
        if self.learner.init_from and self.loop.mode is LoopMode.ASYNC:
            raise ValueError("learner.init_from: fine-tuning runs in loop.mode cycles")
        if any(side % self.model.patch_size for side in self.env.pixels):
            raise ValueError(f"model.patch_size={self.model.patch_size} must divide the camera "
                             f"image size env.pixels={list(self.env.pixels)}")
        if self.loop.mode is LoopMode.ASYNC:
            # The rate limiter is what holds the update-to-data ratio when nothing takes turns.
            if self.replay.rate_limiter is not RateLimiter.SAMPLE_TO_INSERT:
                raise ValueError("replay.rate_limiter: loop.mode=async needs sample_to_insert "
                                 "(it holds the learner's samples per inserted item)")
            if self.cluster.learner_workers != 1:
                raise ValueError("cluster.learner_workers: loop.mode=async runs one learner "
                                 "process (use cycles for a data-parallel learner)")


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Returns value converted to `hint` (int -> float allowed) or raises ConfigError."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [m.value for m in hint]
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return hint(value)
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[X, ...] from a YAML list
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(hint, type) and isinstance(value, hint) and \
            not (hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{path}: expected {name}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown field (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}{name}: missing required field")
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies `a.b=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. learner.batch_size=512")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def _expand_model_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """`model: {preset: small, ...}` -> the preset's sizes, overridden by the keys given."""
    data = dict(data)
    model = data.get("model")
    if isinstance(model, Mapping) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"model.preset: {name!r} is not one of {', '.join(PRESETS)}")
        data["model"] = {**PRESETS[name], **model}
    return data


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _build(ExperimentConfig, _expand_model_preset(data), "")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads and validates a YAML config; every problem is a ConfigError naming the field."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides))


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Plain YAML data (enums as their values, tuples as lists): the inverse of
    `config_from_dict`, so `config_from_dict(config_to_dict(c)) == c`."""
    def plain(v: Any) -> Any:
        return v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v

    return dataclasses.asdict(config, dict_factory=lambda kv: {k: plain(v) for k, v in kv})
