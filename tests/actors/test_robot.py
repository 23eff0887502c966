"""The robot client in-process against a real gateway on loopback: restarts lose and duplicate
nothing, the watchdog idles the robot while the gateway is away, the e-stop stops at once.
The control-period timing is checked with robot and gateway as separate processes
(tests/integration/test_robot_cli.py): here they share one interpreter lock."""

import dataclasses
import socket
import threading
import time

import numpy as np
import pytest
import torch
from dm_env import specs

from actors.envs import make_env_spec
from actors.robot import RobotClient, RobotConfig, RobotStats, clip_action
from actors.robot_uplink import Uploader
from actors.standins import cartpole
from policies.client import publish
from policies.perceiver import PerceiverActorCritic
from policies.server import PolicyServer
from policies.snapshot import Snapshot, snapshot_metadata
from replay.archive import EpisodeArchive
from replay.ingest import EpisodeSink
from tests.fakes import TINY_MODEL, make_episode

PERIOD = 0.1  # control period of the tests' robot, seconds (12 steps per episode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture()
def gateway(tmp_path):
    """A gateway that archives uploads (validated against the cartpole spec) and can restart."""
    spec = make_env_spec(["dm_control:cartpole-swingup"], action_repeat=8)
    archive = EpisodeArchive(tmp_path / "archive")
    sink = EpisodeSink(spec, archive, None, tmp_path / "quarantine")
    port, reports = _free_port(), []

    def start() -> PolicyServer:
        server = PolicyServer(tmp_path / "policies", port=port, heartbeat_seconds=0.1,
                              episode_handler=lambda e: sink.ingest(e, to_replay=False),
                              status_handler=reports.append)
        server.start()
        return server

    server = start()
    torch.manual_seed(0)
    model = PerceiverActorCritic(spec, TINY_MODEL)
    publish(server.address, Snapshot.from_state_dict(
        1, model.state_dict(), snapshot_metadata(spec.to_dict(), TINY_MODEL, 0, 0, 0)))
    state = {"server": server, "reports": reports}
    yield state, start, archive
    state["server"].stop()


class HoldingCartpole:
    """The cartpole stand-in with the optional `hold(action)` a real robot driver provides."""

    def __init__(self):
        self._env, self.holds = cartpole(seed=1, time_limit=1.0), []  # [(monotonic, action)]
        self.steps_in_episode = 0

    def reset(self):
        self.steps_in_episode = 0
        return self._env.reset()

    def step(self, action):
        self.steps_in_episode += 1
        return self._env.step(action)

    def hold(self, action: np.ndarray) -> None:
        self.holds.append((time.monotonic(), np.array(action)))

    def __getattr__(self, name):
        return getattr(self._env, name)


def _robot(tmp_path, address: str, env=None, **overrides) -> RobotClient:
    config = RobotConfig(robot_id="robot-1", spool_dir=str(tmp_path / "spool"),
                         control_period_seconds=PERIOD, staleness_budget_seconds=0.5,
                         upload_retry_seconds=0.2, **overrides)
    return RobotClient(config, address, lambda: env or cartpole(seed=1, time_limit=1.0))


def test_gateway_restart_loses_and_duplicates_nothing(gateway, tmp_path):
    state, start, archive = gateway
    address = state["server"].address
    robot = _robot(tmp_path, address, max_episodes=8)
    runner = threading.Thread(target=robot.run)
    runner.start()
    _wait(lambda: robot.stats.uploaded >= 2, timeout=30)
    idles_before = robot.stats.safe_idle_entries
    state["server"].stop()  # the gateway goes away mid-run
    _wait(lambda: robot.stats.safe_idle_entries > idles_before, timeout=10)
    idle_episodes, idle_periods = robot.stats.episodes, robot.stats.idle_periods
    _wait(lambda: robot.stats.idle_periods >= idle_periods + 10, timeout=10)  # a second idle
    assert robot.stats.episodes == idle_episodes  # no episode started (or was cut) meanwhile
    state["server"] = start()  # same port, same policies/ folder
    runner.join(timeout=60)
    assert not runner.is_alive()
    stats = robot.stats
    archived = [e.lineage for e in archive.episodes()]
    assert stats.episodes == 8 and stats.uploaded == 8
    assert sorted(lin.episode_id for lin in archived) == sorted(stats.episode_ids)
    assert {lin.actor_id for lin in archived} == {"robot-1"}
    assert {lin.policy_version for lin in archived} == {1}
    assert not list((tmp_path / "spool").glob("*.parquet"))


def test_estop_file_stops_at_once_with_the_episode_kept(gateway, tmp_path):
    state, _, archive = gateway
    estop, env = tmp_path / "ESTOP", HoldingCartpole()
    robot = _robot(tmp_path, state["server"].address, env=env, estop_file=str(estop),
                   report_seconds=0.2)
    runner = threading.Thread(target=robot.run)
    runner.start()
    # Mid-episode: its wall-clock limit (1 s) gives a whole one about 12 steps.
    _wait(lambda: robot.stats.episodes >= 1 and 2 <= env.steps_in_episode <= 5, timeout=30)
    t0 = time.monotonic()
    estop.touch()
    runner.join(timeout=10)
    assert not runner.is_alive()
    # The safe action is held within two control periods (and the driver's margin); the
    # process then stops (closing its streams may take longer).
    first_hold = min(t for t, _ in env.holds if t >= t0)
    assert first_hold - t0 < 2 * PERIOD + 0.2, first_hold - t0
    assert robot.stats.estopped
    kept = list(archive.episodes()) + list(EpisodeArchive(tmp_path / "spool").episodes())
    assert len(kept) == robot.stats.episodes
    lengths = sorted(e.length for e in kept)
    assert lengths[0] < lengths[-1]  # the interrupted episode was kept, cut short
    for t, action in env.holds:  # safe action held, from the e-stop on
        if t >= t0:
            np.testing.assert_array_equal(action, np.zeros(1, np.float32))
    # Its status reports (every 0.2 s) told the gateway; the last one, at stop, the e-stop.
    reports = state["reports"]
    assert len(reports) >= 2 and not reports[0]["estopped"]
    assert reports[-1] == {"robot_id": "robot-1", "acting_version": 1,
                           "spool_depth": len(list((tmp_path / "spool").glob("*.parquet"))),
                           "episodes": robot.stats.episodes, "uploaded": robot.stats.uploaded,
                           "safe_idle_entries": 0, "estopped": True}


def test_an_upload_refused_for_good_is_kept_aside_and_the_rest_go_on(gateway, tmp_path):
    state, _, archive = gateway
    spool = EpisodeArchive(tmp_path / "spool")
    spec = make_env_spec(["dm_control:cartpole-swingup"], action_repeat=8)
    good, foreign = make_episode(spec=spec, length=5), make_episode(spec=spec, length=5, seed=1)
    good = dataclasses.replace(good, lineage=dataclasses.replace(good.lineage,
                                                                 actor_id="robot-1"))
    spool.write(foreign)  # recorded by actor-0: the gateway refuses it as robot-1's upload
    spool.write(good)
    stats = RobotStats()
    uploader = Uploader(state["server"].address, "robot-1", spool, 0.1, stats).start()
    _wait(lambda: stats.uploaded == 1 and stats.uploads_rejected == 1, timeout=30)
    uploader.stop()
    assert [e.lineage.episode_id for e in archive.episodes()] == [good.lineage.episode_id]
    rejected = tmp_path / "spool" / "rejected"
    assert (rejected / f"{foreign.lineage.episode_id}.parquet").exists()
    assert "INVALID_ARGUMENT" in (rejected / f"{foreign.lineage.episode_id}.reason.txt").read_text()


def test_a_busy_gateway_is_retried_and_only_an_oversized_episode_is_set_aside(tmp_path, caplog):
    """RESOURCE_EXHAUSTED from a gateway whose stream slots are taken is retried (it used to
    move good episodes to rejected/); the same code for an episode over max_upload_bytes,
    marked permanent by the gateway, sets that episode aside."""
    from policies.client import PolicySubscriber
    from policies.limits import GatewayLimits

    spec = make_env_spec(["dm_control:cartpole-swingup"], action_repeat=8)
    spool = EpisodeArchive(tmp_path / "spool")
    good, big = (make_episode(spec=spec, length=n, seed=n) for n in (5, 400))
    good, big = (dataclasses.replace(e, lineage=dataclasses.replace(e.lineage,
                                                                    actor_id="robot-1"))
                 for e in (good, big))
    sizes = {}
    for episode in (big, good):
        spool.write(episode)
        (path,) = [p for p in spool.paths() if episode.lineage.episode_id in p]
        sizes[episode.lineage.episode_id] = spool.filesystem.get_file_info(path).size
    limit = (sizes[good.lineage.episode_id] + sizes[big.lineage.episode_id]) // 2
    archive = EpisodeArchive(tmp_path / "archive")
    sink = EpisodeSink(spec, archive, None, tmp_path / "quarantine")
    server = PolicyServer(tmp_path / "policies", port=0, heartbeat_seconds=0.1,
                          episode_handler=lambda e: sink.ingest(e, to_replay=False),
                          limits=GatewayLimits(max_upload_bytes=limit, max_streams_total=1,
                                               handler_threads=4))
    address = server.start()
    holder = PolicySubscriber(address, "operator").start()  # takes the one stream slot
    stats = RobotStats()
    try:
        _wait(lambda: server._servicer.slots.in_use == 1, timeout=30)
        uploader = Uploader(address, "robot-1", spool, 0.05, stats).start()
        _wait(lambda: caplog.text.count("failed (StatusCode.RESOURCE_EXHAUSTED); retrying") >= 3,
              timeout=30)
        assert stats.uploads_rejected == 0 and stats.uploaded == 0 and uploader.pending() == 2
        holder.close()  # the slot frees: the good one is stored, the big one set aside
        _wait(lambda: stats.uploaded == 1 and stats.uploads_rejected == 1, timeout=30)
        uploader.stop()
    finally:
        holder.close()
        server.stop()
    assert [e.lineage.episode_id for e in archive.episodes()] == [good.lineage.episode_id]
    reason = tmp_path / "spool" / "rejected" / f"{big.lineage.episode_id}.reason.txt"
    assert reason.read_text().startswith("RESOURCE_EXHAUSTED: ") and "over the" in \
        reason.read_text()


def test_actions_are_clipped_to_the_action_spec():
    spec = specs.BoundedArray((3,), np.float32, minimum=[-1, -0.5, 0], maximum=[1, 0.5, 1])
    action, clipped = clip_action(np.array([2.0, 0.2, -1.0], np.float32), spec)
    np.testing.assert_array_equal(action, np.array([1.0, 0.2, 0.0], np.float32))
    assert clipped == 2
