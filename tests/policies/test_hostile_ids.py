"""Hostile ids at every entry point (issue #11, item 1): an episode, robot or client id never
becomes a path outside its folder, and an id replay cannot key is refused before the archive."""

import dataclasses
import os

import grpc
import pytest

from actors.robot import RobotConfig
from policies.client import PolicyClient
from policies.proto import policy_pb2 as pb
from policies.proto import policy_pb2_grpc as pb_grpc
from policies.server import PolicyServer
from policies.wire import episode_bytes, episode_chunks
from replay.archive import EpisodeArchive
from replay.ids import InvalidIdError, check_episode_id, check_name, safe_file_stem
from replay.ingest import EpisodeSink
from replay.server import episode_key
from tests.fakes import SPEC, make_episode

HOSTILE_EPISODE_IDS = ["../..", "/tmp/pacflow-evil", "../" * 4 + "etc/evil", "g" * 32,
                       "A" * 32, "0" * 31, "0" * 33, "", "0" * 30 + "/x"]
HOSTILE_NAMES = ["", "..", ".hidden", "a/b", "/abs", "robot 7", "r" * 65, "robot-7\n"]


def _files(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("bad", HOSTILE_EPISODE_IDS)
def test_checks_refuse_hostile_episode_ids_by_field(bad):
    with pytest.raises(InvalidIdError, match="episode_id"):
        check_episode_id(bad)
    with pytest.raises(ValueError):
        episode_key(bad)
    assert "/" not in safe_file_stem(bad) and safe_file_stem(bad).startswith("invalid-")
    assert check_episode_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2


@pytest.mark.parametrize("bad", HOSTILE_NAMES)
def test_checks_refuse_hostile_names(bad):
    with pytest.raises(InvalidIdError, match="robot_id"):
        check_name(bad, "robot_id")
    with pytest.raises(ValueError, match="robot_id"):
        RobotConfig(robot_id=bad, spool_dir="/tmp/unused")


def test_archive_paths_come_only_from_valid_ids(tmp_path):
    archive = EpisodeArchive(tmp_path / "archive")
    for bad in HOSTILE_EPISODE_IDS:
        with pytest.raises(InvalidIdError):
            archive.path_of(bad)


def test_hostile_lineage_ids_go_to_quarantine_inside_its_folder(tmp_path):
    """Before the fix an absolute id wrote `<id>.reason.json` wherever it pointed, and a 32-char
    non-hex id reached the archive and then failed in replay."""
    sink = EpisodeSink(SPEC, EpisodeArchive(tmp_path / "run" / "archive"), None,
                       tmp_path / "run" / "quarantine")
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [("episode_id", str(outside / "evil")), ("episode_id", "../../outside/evil"),
             ("episode_id", "g" * 32), ("actor_id", "../../outside/evil")]
    for field, value in cases:
        episode = make_episode()
        episode = dataclasses.replace(episode, lineage=dataclasses.replace(
            episode.lineage, **{field: value}))
        result = sink.ingest(episode, to_replay=True)
        assert not result.stored and result.problems[0].startswith(field), result
    assert _files(outside) == set()
    assert _files(tmp_path / "run" / "archive") == {str(tmp_path / "run" / "archive" /
                                                        "_manifest.json")}
    reasons = sorted((tmp_path / "run" / "quarantine").glob("*.reason.json"))
    assert len(reasons) == 4  # the actor_id case keeps its valid episode id as the name
    assert {os.path.dirname(f) for f in _files(tmp_path)} == {
        str(tmp_path / "run" / "archive"), str(tmp_path / "run" / "quarantine")}


def test_gateway_refuses_hostile_ids_without_writing(tmp_path):
    sink = EpisodeSink(SPEC, EpisodeArchive(tmp_path / "run" / "archive"), None,
                       tmp_path / "run" / "quarantine")
    server = PolicyServer(tmp_path / "run" / "policies", port=0,
                          episode_handler=lambda e: sink.ingest(e, to_replay=False))
    address = server.start()
    before = _files(tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            for episode_id, robot_id in [("../../evil", "robot-7"), ("g" * 32, "robot-7"),
                                         ("0" * 32, "../robot-7"), ("0" * 32, "")]:
                episode = make_episode()
                episode = dataclasses.replace(episode, lineage=dataclasses.replace(
                    episode.lineage, episode_id=episode_id, actor_id=robot_id))
                with pytest.raises(grpc.RpcError) as err:
                    stub.UploadEpisode(episode_chunks(episode_id, robot_id,
                                                      episode_bytes(episode)), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "header." in err.value.details()
            for call in (lambda: list(stub.Subscribe(pb.SubscribeRequest(client_id="../x"),
                                                     timeout=10)),
                         lambda: stub.Pin(pb.PinRequest(version=1, client_id="a/b"), timeout=10),
                         lambda: stub.Act(pb.ActRequest(client_id="..", observation=[0.0]),
                                          timeout=10)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "client_id" in err.value.details()
        with PolicyClient(address, timeout=10) as client:  # a well-formed upload still works
            good = make_episode()
            good = dataclasses.replace(good, lineage=dataclasses.replace(good.lineage,
                                                                         actor_id="robot-7"))
            assert client.upload_episode(good).stored
    finally:
        server.stop()
    assert _files(tmp_path) - before == {
        str(tmp_path / "run" / "archive" / f"{good.lineage.episode_id}.parquet")}
