"""A robot client: runs any dm_env environment outside Ray with policies from the gateway.

The control loop never waits on the network. A subscriber thread receives snapshots; the loop
switches policy only between episodes. A watchdog puts the robot into safe idle (the configured
safe action, episode ended) when the server has not been heard from (a version, a data part or a
heartbeat) for longer than the staleness budget, and resumes once it is. The robot keeps the last
policy it validated; a refused snapshot never replaces it. An e-stop (a file appearing, or
SIGUSR1) stops at once. Finished episodes are spooled to disk and an uploader thread sends them
with retries, so a gateway outage loses nothing; uploads are idempotent by episode_id, so nothing
is duplicated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
import zlib
from typing import Callable

import dm_env
import numpy as np

from actors.envs import flatten_observation
from actors.loop import EpisodeBuffer
from actors.robot_spec import RobotSpec
from actors.robot_uplink import Reporter, Uploader
from policies.client import PLAINTEXT, PolicySubscriber
from policies.policy import PACPolicy
from policies.security import ClientSecurity
from replay.archive import EpisodeArchive
from replay.ids import check_name
from replay.spec import EnvSpec, Episode, Lineage, TaskSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RobotConfig:
    """One robot's identity, timing and safety settings."""

    robot_id: str  # "robot-<id>": lineage actor_id of its episodes and its subscriber id
    spool_dir: str  # finished episodes wait here (Parquet) until the gateway has them
    control_period_seconds: float = 0.05  # one action per period
    staleness_budget_seconds: float = 5.0  # safe idle when the server is silent this long
    safe_action: float = 0.0  # applied to every action dimension in safe idle and at e-stop
    estop_file: str = ""  # e-stop when this file exists ("" = signal only)
    task: str = ""  # task name in the policy's env spec ("" = its first task)
    run_id: str = "robot"  # lineage run_id of the robot's episodes
    max_episodes: int = 0  # stop after this many finished episodes (0 = run until stopped)
    upload_retry_seconds: float = 1.0  # wait between upload attempts while the gateway is down
    report_seconds: float = 5.0  # status reports to the gateway (`pacflow fleet status`)

    def __post_init__(self) -> None:
        check_name(self.robot_id, "robot_id")  # it names the robot's files and its lineage
        for name in ("control_period_seconds", "staleness_budget_seconds",
                     "upload_retry_seconds", "report_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.staleness_budget_seconds <= self.control_period_seconds:
            raise ValueError(f"staleness_budget_seconds={self.staleness_budget_seconds} must "
                             f"exceed control_period_seconds={self.control_period_seconds} (and "
                             "the server's 1 s heartbeat, or the robot idles between them)")


@dataclasses.dataclass
class RobotStats:
    """What the robot did; exported as log lines and read by tests."""

    episodes: int = 0  # finished (spooled) episodes
    uploaded: int = 0  # acknowledged by the gateway
    safe_idle_entries: int = 0  # watchdog trips
    idle_periods: int = 0  # control periods waited between episodes, safe action held
    actions_clipped: int = 0  # action dimensions clipped to the action spec
    actions_nonfinite: int = 0  # NaN/Inf policy outputs replaced by the safe action
    uploads_rejected: int = 0  # episodes the gateway refused for good (kept in spool/rejected)
    max_compute_seconds: float = 0.0  # longest inference + env step within an episode
    estopped: bool = False
    episode_ids: list[str] = dataclasses.field(default_factory=list)


class RobotTaskError(RuntimeError):
    """The policy the robot received has no task for it (`--task`, or its `--spec`'s name)."""


def clip_action(action: np.ndarray, spec: dm_env.specs.BoundedArray) -> tuple[np.ndarray, int]:
    """Clips to the action spec; returns (action, number of clipped dimensions)."""
    clipped = np.clip(action, spec.minimum, spec.maximum).astype(spec.dtype)
    return clipped, int(np.sum(clipped != action))


class RobotClient:
    """The robot's control loop.

    Usage:
        robot = RobotClient(config, gateway="host:port", env_factory=make_env)
        stats = robot.run()     # until max_episodes, stop(), or an e-stop
    """

    def __init__(self, config: RobotConfig, gateway: str,
                 env_factory: Callable[[], dm_env.Environment],
                 security: ClientSecurity = PLAINTEXT, robot_spec: RobotSpec | None = None):
        """`robot_spec`: the robot's own spec file; each policy's task is checked against it."""
        self.config, self.stats, self._robot_spec = config, RobotStats(), robot_spec
        self._env = env_factory()
        self._stop, self._estop = threading.Event(), threading.Event()
        self._subscriber = PolicySubscriber(gateway, config.robot_id, security)
        self._spool = EpisodeArchive(config.spool_dir)
        self._uploader = Uploader(gateway, config.robot_id, self._spool,
                                  config.upload_retry_seconds, self.stats, security)
        self._policy: PACPolicy | None = None
        self._cycle = 0  # the run's cycle the current policy collects for
        self._reporter = Reporter(gateway, security, config.report_seconds, self._status)

    def stop(self) -> None:
        self._stop.set()

    def estop(self) -> None:
        """Stops at once (within one control period), with the safe action applied."""
        self._estop.set()

    def _estopped(self) -> bool:
        if self.config.estop_file and os.path.exists(self.config.estop_file):
            self._estop.set()
        return self._estop.is_set()

    def _fresh(self) -> bool:
        silent = time.monotonic() - self._subscriber.last_contact
        return silent <= self.config.staleness_budget_seconds

    def _status(self) -> dict:
        """What `Reporter` sends (RobotStatus)."""
        return {"robot_id": self.config.robot_id,
                "acting_version": self._policy.policy_version if self._policy else 0,
                "spool_depth": self._uploader.pending(), "episodes": self.stats.episodes,
                "uploaded": self.stats.uploaded,
                "safe_idle_entries": self.stats.safe_idle_entries,
                "estopped": self._estop.is_set()}

    def run(self, drain_seconds: float = 10.0) -> RobotStats:
        self._subscriber.start()
        self._uploader.start()
        self._reporter.start()
        try:
            while not (self._stop.is_set() or self._estopped()):
                if not self._ready():
                    continue
                self._run_episode()
                done = self.config.max_episodes and self.stats.episodes >= self.config.max_episodes
                if done:
                    break
        finally:
            self._apply_safe_action()  # whatever ended the loop, an exception included
            if self._estopped():  # also when it came between episodes
                self.stats.estopped = True
            self._subscriber.close()
            self._uploader.stop(drain_seconds if not self._estop.is_set() else 0.0)
            self._reporter.stop()
        return self.stats

    def _ready(self) -> bool:
        """Between episodes: take the newest policy; wait one period if none or stale."""
        snapshot = self._subscriber.latest()
        if snapshot is not None and self._fresh():
            if self._policy is None or snapshot.version != self._policy.policy_version:
                self._check_task(snapshot.version,
                                 EnvSpec.from_dict(snapshot.metadata["env_spec"]))
                seed = zlib.crc32(self.config.robot_id.encode()) + snapshot.version
                self._policy = PACPolicy.from_snapshot(snapshot, seed=seed)
                # The run publishes a version for the cycle after the one that trained it.
                self._cycle = int(snapshot.metadata.get("cycle", -1)) + 1
                self._warm_up()
                log.info("%s: running policy v%d", self.config.robot_id, snapshot.version)
            return True
        self._apply_safe_action()
        self.stats.idle_periods += 1
        time.sleep(self.config.control_period_seconds)
        return False

    def _check_task(self, version: int, spec: EnvSpec) -> None:
        """The policy has the robot's task, as its own spec file declares it."""
        names = spec.task_names
        if self.config.task and self.config.task not in names:
            raise RobotTaskError(f"policy v{version} has no task {self.config.task} (its tasks: "
                                 f"{', '.join(names)})")
        if self._robot_spec is None:
            return
        theirs = spec.tasks[names.index(self.config.task)] if self.config.task else spec.tasks[0]
        mine, robot = self._robot_spec.task_spec(), self._robot_spec
        for field, a, b in (("observation names", theirs.obs_names, mine.obs_names),
                            ("observation sizes", theirs.obs_sizes, mine.obs_sizes),
                            ("action size", theirs.action_dim, mine.action_dim),
                            ("action bounds", (spec.action_min, spec.action_max),
                             (robot.action_min, robot.action_max))):
            if a != b:
                raise RobotTaskError(f"policy v{version}'s task {theirs.name} has {field} {a}, "
                                     f"the robot's --spec {b}")

    def _warm_up(self) -> None:
        """One inference before the episode, so its first step is not the slow first call."""
        spec = self._policy.model.spec
        pixels = np.zeros((1, *spec.pixels_shape), np.uint8) if spec.pixels_shape else None
        self._policy.act(np.zeros((1, spec.obs_dim), np.float32), np.zeros(1, np.int64), True,
                         pixels)

    def _apply_safe_action(self) -> None:
        """Holds the safe action (environments that cannot idle are simply not stepped)."""
        hold = getattr(self._env, "hold", None)
        if hold is not None:
            hold(self._safe_action())

    def _safe_action(self) -> np.ndarray:
        spec = self._env.action_spec()
        return clip_action(np.full(spec.shape, self.config.safe_action, np.float32), spec)[0]

    def _task(self) -> tuple[EnvSpec, int]:
        spec = self._policy.model.spec
        task_id = spec.task_names.index(self.config.task) if self.config.task else 0
        return spec, task_id

    def _run_episode(self) -> None:
        spec, task_id = self._task()
        task, period = spec.tasks[task_id], self.config.control_period_seconds
        buf, start, ended_by = EpisodeBuffer(), time.time(), None
        episode_id = uuid.uuid4().hex
        seed = int(episode_id[:8], 16) & 0x7FFF_FFFF  # recorded; seeds environments that take one
        if hasattr(self._env, "seed"):
            self._env.seed(seed)
        timestep, next_tick = self._env.reset(), time.monotonic()
        while True:
            obs, pixels = self._observe(timestep, spec, task)
            buf.observe(obs, pixels)
            if timestep.last():
                break
            ended_by = self._interruption()
            if ended_by:
                self._apply_safe_action()  # at once; the bookkeeping below can wait
                break
            t0 = time.monotonic()
            action = self._act(obs, pixels, task_id)
            timestep = self._env.step(action[:task.action_dim])
            self.stats.max_compute_seconds = max(self.stats.max_compute_seconds,
                                                 time.monotonic() - t0)
            buf.record(action, timestep)
            next_tick = max(next_tick + period, time.monotonic() - period)  # no catch-up burst
            time.sleep(max(0.0, next_tick - time.monotonic()))
        if buf.length:
            self._spool_episode(buf.episode(spec, task_id, self._lineage(
                task.name, start, episode_id, seed)))
        if ended_by in ("e-stop", "stale"):
            self._enter_safe_idle()

    def _interruption(self) -> str | None:
        """Why the episode must end now: "e-stop", "stale" (watchdog), "stop", or None."""
        if self._estopped():
            return "e-stop"
        if not self._fresh():
            return "stale"
        return "stop" if self._stop.is_set() else None

    @staticmethod
    def _observe(timestep: dm_env.TimeStep, spec: EnvSpec,
                 task: TaskSpec) -> tuple[np.ndarray, np.ndarray | None]:
        """(obs (obs_dim,) zero-padded, pixels (H, W, 3) uint8 or None)."""
        obs = flatten_observation(timestep.observation, task, spec.obs_dim)
        pixels = np.asarray(timestep.observation["pixels"], np.uint8) \
            if spec.pixels_shape else None
        return obs, pixels

    def _act(self, obs: np.ndarray, pixels: np.ndarray | None, task_id: int) -> np.ndarray:
        action = self._policy.act(obs[None], np.array([task_id]), False,
                                  None if pixels is None else pixels[None])[0]  # (A,)
        action_spec = self._env.action_spec()
        dims = action_spec.shape[0]
        if not np.isfinite(action[:dims]).all():
            self.stats.actions_nonfinite += 1
            action[:dims] = self._safe_action()
        action[:dims], clipped = clip_action(action[:dims], action_spec)
        action[dims:] = 0.0
        self.stats.actions_clipped += clipped
        return action

    def _enter_safe_idle(self) -> None:
        """Counts and reports an interrupted episode (the safe action is already applied)."""
        if self._estop.is_set():
            log.error("%s: E-STOP: safe action applied, stopping", self.config.robot_id)
        else:
            self.stats.safe_idle_entries += 1
            log.error("%s: safe idle (policy stale or server unreachable); episode ended",
                      self.config.robot_id)

    def _lineage(self, task: str, start: float, episode_id: str, seed: int) -> Lineage:
        return Lineage(run_id=self.config.run_id, cycle=self._cycle,
                       policy_version=self._policy.policy_version, actor_id=self.config.robot_id,
                       task=task, episode_id=episode_id, seed=seed, mode="collect",
                       start_time=start, end_time=time.time())

    def _spool_episode(self, episode: Episode) -> None:
        self._spool.write(episode)  # atomic: temp + rename
        self.stats.episodes += 1
        self.stats.episode_ids.append(episode.lineage.episode_id)
        self._uploader.wake()
