"""deploy/configs/smoke.yaml through the real Ray + Reverb + gRPC path, via the CLI."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from replay.archive import EpisodeArchive
from replay.server import ReplayServer, episode_key, sample_items
from replay.spec import EnvSpec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_prints_a_row_per_cycle_and_versions_advance(smoke_run):
    run_dir, stdout, config = smoke_run
    rows = json.loads((run_dir / "cycle.json").read_text())["rows"]
    assert [r["cycle"] for r in rows] == list(range(config.loop.num_cycles))
    assert [r["policy_version"] for r in rows] == list(range(1, config.loop.num_cycles + 1))
    assert [r["learner_steps"] for r in rows] == [
        config.loop.learner_steps_per_cycle * (i + 1) for i in range(config.loop.num_cycles)]
    table = [line for line in stdout.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert len(table) == config.loop.num_cycles
    for sub in ("archive", "quarantine", "checkpoints", "policies", "replay_checkpoints",
                "metrics/targets", "report/returns.png", "config.yaml", "logs/learner.log",
                "logs/replay.log", "logs/policyserver.log", "logs/actor-0.log",
                "logs/actor-1.log"):
        assert (run_dir / sub).exists(), sub
    state = json.loads((run_dir / "cycle.json").read_text())
    assert state["restarts"] == {}
    # Cycles: every episode acts with the newest version its actor has (staleness 0), and the
    # actors and the learner each spend part of the wall-clock time working.
    assert state["staleness"] == {"mean": 0.0, "max": 0}
    assert 0 < state["busy_fraction"]["actors"] < 1 and 0 < state["busy_fraction"]["learner"] < 1
    assert sorted(p.name for p in (run_dir / "policies").glob("*.json")) == \
        [f"v{v:06d}.json" for v in range(1, config.loop.num_cycles + 1)]


def test_every_collected_episode_is_archived_once_with_its_version(smoke_run):
    run_dir, _, config = smoke_run
    episodes = list(EpisodeArchive(run_dir / "archive").episodes())
    collected = [e for e in episodes if e.lineage.mode == "collect"]
    assert len(collected) == config.loop.num_cycles * config.loop.episodes_per_cycle
    assert len({e.lineage.episode_id for e in episodes}) == len(episodes)
    per_cycle = Counter((e.lineage.cycle, e.lineage.policy_version) for e in collected)
    # Cycle 0 acts with the random policy (v0); cycle k with the version published after k-1.
    assert per_cycle == {(c, c): config.loop.episodes_per_cycle
                         for c in range(config.loop.num_cycles)}
    for e in collected:
        assert (e.policy_version == e.lineage.policy_version).all()
        assert {e.lineage.actor_id for e in collected} == {"actor-0", "actor-1"}


def test_reverb_items_carry_the_version_that_produced_them(smoke_run):
    run_dir, _, config = smoke_run
    collected = {episode_key(e.lineage.episode_id): e
                 for e in EpisodeArchive(run_dir / "archive").episodes()
                 if e.lineage.mode == "collect"}
    snapshot = json.loads(sorted((run_dir / "policies").glob("*.json"))[-1].read_text())
    spec = EnvSpec.from_dict(snapshot["metadata"]["env_spec"])
    server = ReplayServer(spec, config.replay, run_dir / "replay_checkpoints")  # restore
    try:
        assert server.num_items() == sum(e.length for e in collected.values())
        items = sample_items(server.address, config.replay.table, 200)
    finally:
        server.stop()
    for i in range(200):
        episode = collected[int(items["episode_key"][i, 0])]
        (step,) = np.flatnonzero((episode.observation == items["observation"][i, 0]).all(1))
        assert items["policy_version"][i, 0] == episode.lineage.policy_version
        np.testing.assert_array_equal(items["action"][i, 0], episode.action[step])


def test_each_process_holds_only_its_own_credentials(smoke_run):
    """The driver sends the learner and each actor their own certificate, key and token as
    bytes; before, every process was given the path of the whole folder (the CA key and every
    client's key and token)."""
    from replay.storage import Storage, scratch_dir

    run_dir, _, _ = smoke_run
    creds, uri = run_dir.parent / "creds", Storage(run_dir).uri
    for process, identity in (("learner", "learner"), ("actor-0", "actor"),
                              ("actor-1", "actor")):
        held = scratch_dir(uri, process) / "credentials"
        assert sorted(p.name for p in held.iterdir()) == ["ca", "cert", "key", "token"]
        assert (held / "key").read_bytes() == (creds / "clients" / f"{identity}.key").read_bytes()
        assert (held / "token").read_bytes() == \
            (creds / "clients" / f"{identity}.token").read_bytes()
        assert (held / "key").stat().st_mode & 0o077 == 0
