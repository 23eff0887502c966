"""Camera-image and language tokens: the model reads them, the learner trains through them."""

import dataclasses
import itertools

import pytest
import torch

from learners.config import LearnerConfig
from learners.learner import PACLearner
from policies.perceiver import PAD_BYTE, PerceiverActorCritic, count_parameters
from replay.spec import EnvSpec, TaskSpec
from tests.fakes import PIXEL_SPEC, SPEC, TINY_MODEL, random_batches

PIXEL_MODEL = dataclasses.replace(TINY_MODEL, patch_size=4)  # 16x16 -> 16 patch tokens


def _inputs(spec: EnvSpec, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, spec.obs_dim, generator=g)
    pixels = torch.randint(0, 256, (B, *spec.pixels_shape), generator=g, dtype=torch.uint8)
    return obs, torch.zeros(B, dtype=torch.long), pixels


def test_pixels_reach_the_policy_and_are_required():
    torch.manual_seed(0)
    model = PerceiverActorCritic(PIXEL_SPEC, PIXEL_MODEL)
    obs, task, pixels = _inputs(PIXEL_SPEC)
    assert model.image_tokens(pixels).shape == (3, 16, PIXEL_MODEL.width)
    logits = model.policy_logits(model.encode(obs, task, pixels))
    other = model.policy_logits(model.encode(obs, task, 255 - pixels))
    assert logits.shape == (3, SPEC.action_dim, PIXEL_MODEL.num_action_bins)
    assert not torch.allclose(logits, other)  # the image changes the action distribution
    with pytest.raises(ValueError, match="pass pixels"):
        model.encode(obs, task)
    assert count_parameters(model) > count_parameters(PerceiverActorCritic(SPEC, PIXEL_MODEL))


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="model.patch_size=5 must divide the camera image"):
        PerceiverActorCritic(PIXEL_SPEC, dataclasses.replace(TINY_MODEL, patch_size=5))


def _language_spec(*instructions: str) -> EnvSpec:
    tasks = tuple(TaskSpec(f"dm_control:fake-{i}", ("x",), (4,), 2, text)
                  for i, text in enumerate(instructions))
    return EnvSpec(tasks, -1.0, 1.0)


def test_language_tokens_condition_the_encoding_and_padding_is_invisible():
    spec = _language_spec("go", "balance the pole upright")
    torch.manual_seed(0)
    model = PerceiverActorCritic(spec, TINY_MODEL)
    assert model.instruction_ids.shape == (2, len("balance the pole upright"))
    obs = torch.randn(2, 4)
    z0, z1 = model.encode(obs, torch.tensor([0, 0])), model.encode(obs, torch.tensor([0, 1]))
    assert torch.allclose(z0[0], z1[0]) and not torch.allclose(z0[1], z1[1])
    with torch.no_grad():  # "go" is padded to 24 bytes: the padding embedding must not matter
        model.language_embedding.weight[PAD_BYTE] += 100.0
    assert torch.allclose(model.encode(obs, torch.tensor([0, 0])), z0, atol=1e-6)


def test_learner_trains_the_image_stem_from_pixel_batches():
    config = LearnerConfig(batch_size=8, device="cpu", num_threads=1)
    learner = PACLearner(PIXEL_SPEC, PIXEL_MODEL, config, random_batches(8, spec=PIXEL_SPEC),
                         seed=0)
    before = learner.model.image_stem.patches.weight.detach().clone()
    metrics = [learner.step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert not torch.equal(before, learner.model.image_stem.patches.weight)


def test_learner_without_pixels_in_the_batch_fails_clearly():
    config = LearnerConfig(batch_size=8, device="cpu", num_threads=1)
    batches = (b for b in itertools.islice(random_batches(8), 1))  # no pixels
    learner = PACLearner(PIXEL_SPEC, PIXEL_MODEL, config, batches, seed=0)
    with pytest.raises(ValueError, match="pass pixels"):
        learner.step()
