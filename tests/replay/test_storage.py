"""Run storage on a local folder and on a real S3 server (moto's, on loopback): every durable
artifact (checkpoints, snapshots, replay checkpoints, quarantine) goes through it."""

import json
import socket

import numpy as np
import pytest

from learners.checkpoints import CheckpointError, load_checkpoint, load_latest_good, \
    save_checkpoint
from policies.store import PolicyStore
from policies.snapshot import Snapshot, load_snapshot, save_snapshot
from replay.adders import ReverbSequenceAdder
from replay.config import ReplayConfig
from replay.server import ReplayServer
from replay.storage import Storage, StorageError, join
from replay.validation import quarantine
from tests.fakes import SPEC, make_episode


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh run storage URI: a local folder, or a prefix in moto's S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_prefix")[0] + "/run"


def test_put_get_list_and_names_that_leave_the_root_are_refused(root):
    store = Storage(root)
    store.put_bytes("a/b.json", b"1")
    store.put_bytes("a/c/d.bin", b"22")
    store.put_bytes("e.txt", b"333")
    assert store.get_bytes("a/b.json") == b"1" and store.exists("a/c/d.bin")
    assert store.list_files() == ["e.txt"] and store.list_dirs() == ["a"]
    assert store.list_files("a") == ["b.json"] and store.list_dirs("a") == ["c"]
    assert store.child("a").get_bytes("c/d.bin") == b"22"
    store.put_bytes("e.txt", b"4")  # a rewrite replaces, leaving no temp files behind
    assert store.get_bytes("e.txt") == b"4" and store.list_files() == ["e.txt"]
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(ValueError, match="relative"):
            store.put_bytes(bad, b"")
    assert not store.exists("x")


def test_an_unreachable_or_missing_bucket_is_one_line_naming_the_uri(s3_prefix, monkeypatch):
    with pytest.raises(StorageError, match=r"^storage s3://no-such-bucket-7/run is not writable"):
        Storage("s3://no-such-bucket-7/run").check_writable()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as e:
        Storage(s3_prefix[0]).check_writable()
    assert s3_prefix[0] in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_round_trip_and_an_incomplete_newest_one_is_skipped(root):
    import torch

    from tests.learners.test_learner import _learner

    learner = _learner()
    learner.run(1)
    first = save_checkpoint(learner.state(), join(root, "checkpoints"), step=1, cycle=0)
    learner.run(1)
    second = save_checkpoint(learner.state(), join(root, "checkpoints"), step=2, cycle=1)
    state = load_checkpoint(second)
    assert state["num_steps"] == 2 and state["cycle"] == 1 and state["path"] == second
    for k, v in learner.get_variables().items():
        torch.testing.assert_close(state["model"][k], v)
    # A save that died before its manifest (the marker written last) is not a checkpoint.
    Storage(second).fs.delete_file(Storage(second).path("manifest.json"))
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_checkpoint(second)
    assert load_latest_good(join(root, "checkpoints"))["path"] == first


def test_snapshots_and_pins_survive_a_policy_server_restart(root):
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    import torch

    store = PolicyStore(join(root, "policies"))
    for version in (1, 2):
        store.add(Snapshot.from_state_dict(version, {"w": torch.tensor(weights["w"]) * version},
                                           {"cycle": version}))
    store.pin(1, "robot-7")
    restarted = PolicyStore(join(root, "policies"))  # e.g. on another node
    assert sorted(restarted.infos) == [1, 2] and restarted.target("robot-7") == 1
    snapshot, _ = restarted.get(2)
    np.testing.assert_array_equal(snapshot.state_dict()["w"].numpy(), weights["w"] * 2)
    meta = save_snapshot(Snapshot.from_state_dict(3, {"w": torch.ones(2)}, {}), root)
    assert load_snapshot(meta).version == 3


def test_quarantine_writes_the_episode_and_its_reason_into_storage(root):
    episode = make_episode(length=3)
    path = quarantine(episode, ["observation: non-finite values"], join(root, "quarantine"))
    store = Storage(join(root, "quarantine"))
    record = json.loads(store.get_bytes(f"{episode.lineage.episode_id}.reason.json"))
    assert record["reasons"] == ["observation: non-finite values"]
    assert path.endswith(".reason.json") and store.exists(f"{episode.lineage.episode_id}.parquet")


def test_replay_restores_from_storage_on_a_node_without_its_local_checkpoint(s3_prefix,
                                                                             tmp_path):
    """Reverb checkpoints locally; the checkpoint is uploaded with its manifest, and a server
    started with an empty local folder (another node) downloads and restores it."""
    stored = f"{s3_prefix[0]}/replay_checkpoints"
    config = ReplayConfig(n_step=2, timeout_seconds=10)
    first = ReplayServer(SPEC, config, tmp_path / "node-a", storage=stored)
    adder = ReverbSequenceAdder(first.address, config)
    adder.add_episode(make_episode(length=5, seed=1))
    first.checkpoint()
    adder.add_episode(make_episode(length=3, seed=2))
    newest = first.checkpoint()
    first.stop()
    latest = json.loads(Storage(stored).get_bytes("LATEST.json"))
    assert newest.endswith(latest["current"]) and latest["previous"]
    assert sorted(Storage(stored).list_dirs()) == sorted([latest["current"], latest["previous"]])
    second = ReplayServer(SPEC, config, tmp_path / "node-b", storage=stored)
    try:
        assert second.num_items() == 8
    finally:
        second.stop()
