"""Shapes and the late-fusion property of the Perceiver actor-critic."""

import torch

from policies.perceiver import PerceiverActorCritic
from tests.fakes import SPEC, TINY_MODEL


def _model():
    torch.manual_seed(0)
    return PerceiverActorCritic(SPEC, TINY_MODEL).eval()


def test_output_shapes():
    model = _model()
    z = model.encode(torch.randn(3, SPEC.obs_dim), torch.zeros(3, dtype=torch.long))
    assert z.shape == (3, TINY_MODEL.num_latents, TINY_MODEL.width)
    assert model.policy_logits(z).shape == (3, SPEC.action_dim, TINY_MODEL.num_action_bins)
    bins = torch.randint(0, TINY_MODEL.num_action_bins, (3, 7, SPEC.action_dim))
    assert model.q_logits(z, bins).shape == (3, 7, TINY_MODEL.num_value_bins)


def test_scoring_n_actions_at_once_equals_scoring_each_alone():
    model = _model()
    z = model.encode(torch.randn(2, SPEC.obs_dim), torch.zeros(2, dtype=torch.long))
    bins = torch.randint(0, TINY_MODEL.num_action_bins, (2, 5, SPEC.action_dim))
    together = model.q_logits(z, bins)
    alone = torch.cat([model.q_logits(z, bins[:, i:i + 1]) for i in range(5)], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_action_bins_round_trip():
    model = _model()
    bins = torch.arange(TINY_MODEL.num_action_bins).repeat(SPEC.action_dim, 1).T  # (K, A)
    assert torch.equal(model.action_to_bins(model.bins_to_action(bins)), bins)
    assert model.action_to_bins(torch.tensor([[-5.0, 5.0]])).tolist() == [[0, 4]]


def test_presets_have_their_advertised_sizes():
    from policies.perceiver import PRESETS, PerceiverConfig, count_parameters

    expected_millions = {"tiny": (0.1, 0.5), "small": (8, 12), "base": (80, 120),
                         "large": (900, 1100)}
    for name, sizes in PRESETS.items():
        with torch.device("meta"):  # no memory for the 1B model
            model = PerceiverActorCritic(SPEC, PerceiverConfig(**sizes))
        lo, hi = expected_millions[name]
        assert lo <= count_parameters(model) / 1e6 <= hi, name
