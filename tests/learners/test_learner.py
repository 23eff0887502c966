"""The PAC learner step and its checkpoints."""

import dataclasses
import hashlib
import json
import itertools
from pathlib import Path

import pytest
import torch

from learners import losses
from learners.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from learners.config import LearnerConfig
from learners.learner import PACLearner
from tests.fakes import SPEC, TINY_MODEL, random_batches


def _learner(**overrides) -> PACLearner:
    config = LearnerConfig(batch_size=16, device="cpu", num_threads=1,
                           **overrides)
    return PACLearner(SPEC, TINY_MODEL, config, random_batches(16), seed=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_alpha_one_beta_zero_gradients_equal_plain_behaviour_cloning():
    learner = _learner(alpha=1.0, beta=0.0, max_grad_norm=1e9)
    batch = next(random_batches(16, seed=7))
    learner.iterator = iter([batch])
    learner.optimizer.step = lambda: None  # keep weights fixed to compare gradients
    learner.step()
    pac_grads = _grads(learner.model)

    model = learner.model
    model.zero_grad()
    logits = model.policy_logits(model.encode(batch.observation[:, 0], batch.task_id))
    losses.behaviour_cloning_loss(logits, model.action_to_bins(batch.action[:, 0])).backward()
    bc_grads = _grads(model)
    assert set(bc_grads) <= set(pac_grads)
    for name, g in bc_grads.items():
        torch.testing.assert_close(pac_grads[name], g, msg=name)
    for name in set(pac_grads) - set(bc_grads):  # critic parameters get no gradient
        assert torch.count_nonzero(pac_grads[name]) == 0, name


def test_critic_loss_falls_on_a_fixed_batch():
    learner = _learner(learning_rate=3e-3)
    batch = next(random_batches(16, seed=3))
    # Terminal transitions: the target is the projected n-step reward, fixed across steps.
    batch = dataclasses.replace(batch, discount=torch.zeros_like(batch.discount))
    learner.iterator = itertools.repeat(batch)
    first = learner.step()["l_q"]
    for _ in range(60):
        last = learner.step()["l_q"]
    assert last < first * 0.5


def test_run_stops_early_when_the_batches_end():
    learner = PACLearner(SPEC, TINY_MODEL, LearnerConfig(batch_size=16, device="cpu",
                                                         num_threads=1),
                         itertools.islice(random_batches(16), 3), seed=0)
    metrics = learner.run(10)
    assert learner.num_steps == 3 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert learner.run(5) == {} and learner.num_steps == 3


def test_target_network_is_copied_every_period():
    learner = _learner(target_update_period=3)
    learner.run(2)
    online, target = learner.model.state_dict(), learner.target.state_dict()
    assert any(not torch.equal(online[k], target[k]) for k in online)
    learner.run(1)
    online, target = learner.model.state_dict(), learner.target.state_dict()
    assert all(torch.equal(online[k], target[k]) for k in online)


def test_checkpoint_round_trip_and_corruption_is_refused(tmp_path):
    learner = _learner()
    learner.run(2)
    path = Path(save_checkpoint(learner.state(), tmp_path, step=learner.num_steps, cycle=0))
    state = load_checkpoint(path)
    assert state["num_steps"] == 2 and state["cycle"] == 0
    for k, v in learner.get_variables().items():
        torch.testing.assert_close(state["model"][k], v)
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF  # one flipped bit loads silently without the manifest check
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("overrides", [{"critic_target": "hl_gauss"}, {"target_update": "polyak"}])
def test_learner_variants_train(overrides):
    from learners.config import CriticTarget, TargetUpdate

    kinds = {"critic_target": CriticTarget, "target_update": TargetUpdate}
    learner = _learner(**{k: kinds[k](v) for k, v in overrides.items()})
    metrics = learner.run(3)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    if "target_update" in overrides:  # Polyak: the target moved, but is not a copy
        online, target = learner.model.state_dict(), learner.target.state_dict()
        assert any(not torch.equal(online[k], target[k]) for k in online)


def test_resume_gives_the_uninterrupted_runs_next_loss(tmp_path):
    batches = list(itertools.islice(random_batches(16, seed=11), 7))
    uninterrupted = _learner()
    uninterrupted.iterator = iter(batches)
    uninterrupted.run(5)
    path = save_checkpoint(uninterrupted.state(), tmp_path, step=5, cycle=0)
    expected = [uninterrupted.step()["loss"] for _ in range(2)]

    torch.manual_seed(1234)  # a fresh process would have another RNG state
    resumed = _learner()
    resumed.restore(load_checkpoint(path))
    resumed.iterator = iter(batches[5:])
    assert [resumed.step()["loss"] for _ in range(2)] == expected
    assert resumed.num_steps == 7


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    import pickle

    from learners.checkpoints import load_latest_good

    learner = _learner()
    learner.run(1)
    good = save_checkpoint(learner.state(), tmp_path, step=1, cycle=0)
    learner.run(1)
    newest = Path(save_checkpoint(learner.state(), tmp_path, step=2, cycle=1))
    with open(newest / "model.safetensors", "r+b") as f:  # truncate
        f.truncate(100)
    assert load_latest_good(tmp_path)["path"] == str(good)

    marker = tmp_path / "payload-ran"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # A pickle-bearing optim.pt with a matching manifest is still refused.
    newest = Path(save_checkpoint(learner.state(), tmp_path, step=3, cycle=2))
    (newest / "optim.pt").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["optim.pt"] = hashlib.sha256((newest / "optim.pt").read_bytes()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="optim.pt refused"):
        load_checkpoint(newest)
    assert load_latest_good(tmp_path)["path"] == str(good)
    assert not marker.exists()  # refused without running the payload
    assert newest.exists() and (newest.parent / "step_000000002").exists()  # kept to inspect


def test_a_save_cut_short_is_skipped_and_removed(tmp_path):
    from learners.checkpoints import load_latest_good

    learner = _learner()
    learner.run(1)
    good = save_checkpoint(learner.state(), tmp_path, step=1, cycle=0)
    cut = Path(save_checkpoint(learner.state(), tmp_path, step=2, cycle=1))
    (cut / "manifest.json").unlink()  # the manifest goes last: this is a save that died
    (cut / ".optim.pt.123.tmp").write_bytes(b"partial")
    assert load_latest_good(tmp_path)["path"] == str(good)
    assert not cut.exists() and Path(good).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_step_is_finite():
    config = LearnerConfig(batch_size=16, device="cuda")
    learner = PACLearner(SPEC, TINY_MODEL, config, random_batches(16), seed=0)
    assert learner.model.value_support.is_cuda
    metrics = learner.run(3)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_normalisation_statistics_in_a_snapshot_give_identical_actions_elsewhere(tmp_path):
    """The learner's observation statistics travel in the snapshot: a separate process that
    loads it from disk chooses exactly the actions this one does."""
    import subprocess
    import sys

    import numpy as np

    from policies.policy import PACPolicy
    from policies.snapshot import Snapshot, save_snapshot, snapshot_metadata

    scale = torch.tensor([1.0, 10.0, 50.0, 0.1, 200.0])  # far from unit scale
    batches = (dataclasses.replace(b, observation=b.observation * scale + 3.0)
               for b in random_batches(16, seed=5))
    learner = PACLearner(SPEC, TINY_MODEL, LearnerConfig(batch_size=16, device="cpu",
                                                         num_threads=1), batches, seed=0)
    learner.run(5)
    stats = learner.model.normalizer
    assert stats.count[0] == 5 * 16
    torch.testing.assert_close(stats.var[0].sqrt(), scale.double(), rtol=0.35, atol=0)
    snapshot = Snapshot.from_state_dict(1, learner.get_variables(), snapshot_metadata(
        SPEC.to_dict(), TINY_MODEL, 0, learner.num_steps, 0))
    meta = save_snapshot(snapshot, tmp_path)
    obs = (np.random.default_rng(0).normal(size=(64, SPEC.obs_dim)) * scale.numpy() + 3.0)
    np.save(tmp_path / "obs.npy", obs.astype(np.float32))
    here = PACPolicy.from_snapshot(snapshot, seed=0).act(
        obs.astype(np.float32), np.zeros(64, np.int64), greedy=True)
    code = (
        "import sys, numpy as np\n"
        "from policies.policy import PACPolicy\n"
        "from policies.snapshot import load_snapshot\n"
        f"p = PACPolicy.from_snapshot(load_snapshot({str(meta)!r}), seed=0)\n"
        f"obs = np.load({str(tmp_path / 'obs.npy')!r})\n"
        f"np.save({str(tmp_path / 'there.npy')!r}, p.act(obs, np.zeros(64, np.int64), True))\n")
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[2])
    there = np.load(tmp_path / "there.npy")
    np.testing.assert_array_equal(here, there)
    # Without the statistics the same weights act differently: they matter.
    blank = PACPolicy.from_snapshot(snapshot, seed=0)
    blank.model.normalizer.count.zero_()
    blank.model.normalizer.mean.zero_()
    blank.model.normalizer.var.fill_(1.0)
    assert not np.array_equal(blank.act(obs.astype(np.float32), np.zeros(64, np.int64), True),
                              here)


def test_cpu_optimizer_is_fused():
    learner = _learner()
    assert learner.optimizer.defaults["fused"] is True


def test_a_checkpoint_or_snapshot_of_another_layout_is_refused_by_name(tmp_path):
    from policies.policy import PACPolicy
    from policies.snapshot import Snapshot, SnapshotError, snapshot_metadata

    learner = _learner()
    learner.run(1)
    path = save_checkpoint(learner.state(), tmp_path, step=1, cycle=0)
    state = load_checkpoint(path)
    other = PACLearner(SPEC, dataclasses.replace(TINY_MODEL, num_action_bins=7),
                       LearnerConfig(batch_size=16, device="cpu", num_threads=1),
                       random_batches(16), seed=0)
    with pytest.raises(CheckpointError, match="does not fit this learner"):
        other.restore(state)
    del state["log_entropy_multiplier"]  # as written by an older pacflow
    with pytest.raises(CheckpointError, match="log_entropy_multiplier"):
        learner.restore(state)
    weights = {k: v for k, v in learner.get_variables().items()
               if not k.startswith("normalizer.")}  # an older network had no statistics
    old = Snapshot.from_state_dict(3, weights, snapshot_metadata(SPEC.to_dict(), TINY_MODEL, 0,
                                                                 1, 2))
    with pytest.raises(SnapshotError, match="v3 does not fit this network"):
        PACPolicy.from_snapshot(old, seed=0)
