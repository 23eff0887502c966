"""The policy service on a free loopback port: chunked snapshots, resume, pins, uploads, Act."""

import dataclasses
import threading

import grpc
import numpy as np
import pytest
import torch

from policies.client import PolicyClient, PolicySubscriber
from policies.gateway import ActBatcher
from policies.perceiver import PerceiverActorCritic
from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.server import PolicyServer
from policies.snapshot import Snapshot, snapshot_metadata
from policies.stream import parse_frame, publish_frames, read_snapshots
from policies.wire import WireError, episode_bytes, episode_chunks
from replay.adders import ReverbSequenceAdder
from replay.archive import EpisodeArchive
from replay.config import ReplayConfig
from replay.ingest import EpisodeSink
from replay.server import ReplayServer
from tests.fakes import SPEC, TINY_MODEL, make_episode


def _snapshot(version: int, seed: int = 0, model=TINY_MODEL) -> Snapshot:
    torch.manual_seed(seed)
    net = PerceiverActorCritic(SPEC, model)
    meta = snapshot_metadata(SPEC.to_dict(), model, version - 1, 0, version - 1)
    return Snapshot.from_state_dict(version, net.state_dict(), meta)


@pytest.fixture()
def server(tmp_path):
    srv = PolicyServer(tmp_path / "policies", port=0, heartbeat_seconds=0.2)
    address = srv.start()
    client = PolicyClient(address, timeout=30)
    yield srv, address, client
    client.close()
    srv.stop()


def test_a_snapshot_over_the_message_limit_travels_in_chunks(server):
    _, _, client = server
    big = Snapshot.from_state_dict(1, {"w": torch.randn(3_000_000)}, {"note": "12 MB"})
    assert len(big.weights) > 8 << 20  # larger than one message may be
    assert client.publish(big) == 1
    assert client.fetch(1).sha256 == big.sha256
    assert client.list().versions[0].total_bytes == len(big.weights)


def test_truncated_or_oversized_snapshot_streams_are_refused():
    parts = [parse_frame(f) for f in publish_frames(_snapshot(1), chunk_bytes=4096)]
    assert [s.version for s, _ in read_snapshots(parts)] == [1]
    with pytest.raises(WireError, match="ended after"):
        list(read_snapshots(parts[:-1]))
    with pytest.raises(WireError, match="ended after"):
        list(read_snapshots(parts[:-2] + parts[-1:]))  # the end part, a data part short
    with pytest.raises(WireError, match="over the limit"):
        list(read_snapshots(parts, max_bytes=1000))


def test_subscribe_resumes_from_a_version_and_heartbeats_when_idle(server):
    _, address, client = server
    for v in (1, 2, 3):
        client.publish(_snapshot(v, seed=v))
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.PolicyServiceStub(channel).Subscribe(
            pb.SubscribeRequest(after_version=1, client_id="r", every_version=True), timeout=10)
        beats = []
        got = read_snapshots(stream, on_heartbeat=beats.append)
        assert [next(got)[0].version, next(got)[0].version] == [2, 3]
        stream.cancel()
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.PolicyServiceStub(channel).Subscribe(
            pb.SubscribeRequest(after_version=3, client_id="r"), timeout=10)
        first = next(stream)
        assert first.WhichOneof("part") == "heartbeat" and first.heartbeat.latest_version == 3
        stream.cancel()


def test_pins_roll_back_one_client_or_the_fleet(server, tmp_path):
    srv, address, client = server
    client.publish(_snapshot(1))
    client.publish(_snapshot(2, seed=2))
    robot, actor = (PolicySubscriber(address, c).start() for c in ("robot-7", "actor-0"))
    try:
        assert robot.wait_for_version(2, 10).version == actor.wait_for_version(2, 10).version
        reply = client.pin(1, client_id="robot-7")
        assert dict(reply.client_pins) == {"robot-7": 1}
        _wait(lambda: robot.latest().version == 1)
        assert actor.latest().version == 2  # only robot-7 was pinned
        client.unpin("robot-7")
        _wait(lambda: robot.latest().version == 2)
        client.pin(1)  # the whole fleet
        _wait(lambda: actor.latest().version == 1 and robot.latest().version == 1)
        assert client.fetch().version == 1
    finally:
        robot.close()
        actor.close()
    with pytest.raises(grpc.RpcError) as err:
        client.pin(9)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    srv.stop()
    restarted = PolicyServer(tmp_path / "policies", port=0)
    try:
        with PolicyClient(restarted.start()) as again:
            assert again.list().fleet_pin == 1  # pins survive a restart
    finally:
        restarted.stop()


def _wait(predicate, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError("condition not reached")


def test_subscriber_refuses_changed_shapes_and_keeps_its_policy(server):
    _, address, client = server
    client.publish(_snapshot(1))
    sub = PolicySubscriber(address, "actor-0").start()
    try:
        sub.wait_for_version(1, 10)
        wider = dataclasses.replace(TINY_MODEL, width=32)
        client.publish(_snapshot(2, model=wider))
        _wait(lambda: sub.refused == 1)
        assert sub.latest().version == 1
    finally:
        sub.close()


def test_nan_weights_are_refused_at_publish(server):
    _, _, client = server
    state = {k: v.clone() for k, v in _snapshot(1).state_dict().items()}
    next(iter(state.values())).view(-1)[0] = float("nan")
    with pytest.raises(grpc.RpcError) as err:
        client.publish(Snapshot.from_state_dict(1, state, {}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-finite" in err.value.details()


def test_uploads_are_validated_archived_replayed_and_idempotent(tmp_path):
    config = ReplayConfig(n_step=1, timeout_seconds=10)
    replay = ReplayServer(SPEC, config, tmp_path / "replay")
    archive = EpisodeArchive(tmp_path / "archive")
    sink = EpisodeSink(SPEC, archive, ReverbSequenceAdder(replay.address, config),
                       tmp_path / "quarantine")
    srv = PolicyServer(tmp_path / "policies", port=0,
                       episode_handler=lambda e: sink.ingest(e, to_replay=True))
    try:
        address = srv.start()
        with PolicyClient(address, timeout=10) as client:
            episode = _robot_episode(seed=1)
            first = client.upload_episode(episode)
            again = client.upload_episode(episode)
            assert (first.stored, first.duplicate) == (True, False)
            assert (again.stored, again.duplicate) == (False, True)
            bad = _robot_episode(seed=2)
            bad.reward[0] = np.nan
            reply = client.upload_episode(bad)
            assert not reply.stored and "reward: non-finite" in reply.quarantined
            forged = dataclasses.replace(episode, lineage=dataclasses.replace(
                episode.lineage, episode_id="f" * 32, actor_id="robot-8"))
            with grpc.insecure_channel(address) as channel:  # robot-8's episode sent as robot-7
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.PolicyServiceStub(channel).UploadEpisode(
                        episode_chunks("f" * 32, "robot-7", episode_bytes(forged)), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "recorded by 'robot-8'" in err.value.details()
        (stored,) = [e for e in archive.episodes()]
        assert stored.lineage.actor_id == "robot-7"
        assert replay.num_items() == episode.length
        assert (tmp_path / "quarantine" / f"{bad.lineage.episode_id}.reason.json").exists()
    finally:
        srv.stop()
        replay.stop()


def test_a_slow_store_answers_later_uploads_unavailable_and_frees_their_threads(tmp_path):
    """While one upload's store hangs (replay frozen), the next waits at most its deadline less
    1 s and is told UNAVAILABLE (robots retry it) instead of holding a handler thread until the
    store answers; a store that gives up (TimeoutError) is UNAVAILABLE too."""
    archive = EpisodeArchive(tmp_path / "archive")
    sink = EpisodeSink(SPEC, archive, None, tmp_path / "quarantine")
    entered, release, calls = threading.Event(), threading.Event(), []

    def slow_store(episode):
        calls.append(episode.lineage.episode_id)
        if len(calls) == 1:
            entered.set()
            release.wait(60)
        if len(calls) == 2:
            raise TimeoutError("replay did not answer within 20 s")
        return sink.ingest(episode, to_replay=False)

    srv = PolicyServer(tmp_path / "policies", port=0, episode_handler=slow_store)
    first, second = _robot_episode(seed=1), _robot_episode(seed=2)
    try:
        address = srv.start()
        replies = []
        hung = threading.Thread(target=lambda: replies.append(
            PolicyClient(address, timeout=60).upload_episode(first)))
        hung.start()
        assert entered.wait(30)
        with PolicyClient(address, timeout=3) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.upload_episode(second)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "still storing an earlier upload" in err.value.details()
        assert calls == [first.lineage.episode_id]  # it never reached the store
        release.set()
        hung.join(30)
        assert replies[0].stored
        with PolicyClient(address, timeout=10) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.upload_episode(second)  # the store gives up this time
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "replay did not answer within 20 s" in err.value.details()
            assert client.upload_episode(second).stored  # and the retry is stored
    finally:
        release.set()
        srv.stop()
    assert {e.lineage.episode_id for e in archive.episodes()} == \
        {first.lineage.episode_id, second.lineage.episode_id}


def _robot_episode(seed: int):
    episode = make_episode(length=5, seed=seed)
    return dataclasses.replace(episode, lineage=dataclasses.replace(episode.lineage,
                                                                    actor_id="robot-7"))


def test_concurrent_act_calls_share_forward_passes(server):
    srv, address, client = server
    with pytest.raises(grpc.RpcError) as err:
        client.act(np.zeros(SPEC.obs_dim))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    client.publish(_snapshot(1))
    batcher = ActBatcher(lambda _: _snapshot(1), max_wait_seconds=0.5)
    results = [None] * 8
    calls = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.act(
        pb.ActRequest(observation=[0.1 * i] * SPEC.obs_dim, greedy=True), "", timeout=10)))
        for i in range(8)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert all(r[0].shape == (SPEC.action_dim,) and r[1] == 1 for r in results)
    assert max(batcher.batch_sizes) > 1 and sum(k * n for k, n in batcher.batch_sizes.items()) == 8
    batcher.close()
    action, version = client.act(np.zeros(SPEC.obs_dim), greedy=True)
    assert action.shape == (SPEC.action_dim,) and version == 1
    with pytest.raises(grpc.RpcError) as err:
        client.act(np.zeros(SPEC.obs_dim + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
