"""Shapes and the late-fusion property of the Perceiver actor-critic."""

import pytest
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


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_distinct_magnitudes_give_distinct_tokens():
    """The tokens of 5, 10 and 20 (after the encoder's LayerNorm) point different ways; with one
    shared Linear(1, W) of the raw value, their cosine similarity was above 0.99."""
    model = _model()
    values = torch.tensor([5.0, 10.0, 20.0])
    obs = torch.zeros(3, SPEC.obs_dim)
    obs[:, 4] = values  # one dimension takes the three magnitudes
    tokens = model.observation_tokens(obs)[:, 4]  # (3, W)
    normed = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert _cosine(normed[i], normed[j]) < 0.9, (values[i].item(), values[j].item())


def test_neighbouring_action_bins_have_closer_q_queries_than_distant_ones():
    model = _model()
    table = model.action_table().view(SPEC.action_dim, TINY_MODEL.num_action_bins, -1)
    with torch.no_grad():  # the learned per-bin part alone is unordered: remove it
        model.action_embedding.weight.zero_()
    ordinal = model.action_table().view_as(table)[0]  # (K, W) for dimension 0
    near = torch.dist(ordinal[0], ordinal[1]).item()
    far = torch.dist(ordinal[0], ordinal[-1]).item()
    assert near < far
    assert table.shape == (SPEC.action_dim, TINY_MODEL.num_action_bins, TINY_MODEL.width)


def test_normalisation_statistics_travel_in_the_state_dict():
    from policies.normalization import batch_moments

    model = _model()
    obs = torch.randn(64, SPEC.obs_dim) * 30 + 100
    task = torch.zeros(64, dtype=torch.long)
    model.normalizer.update(batch_moments(obs, task, 1))
    copy = PerceiverActorCritic(SPEC, TINY_MODEL).eval()
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.normalizer(obs, task), model.normalizer(obs, task))
    z1, z2 = model.encode(obs, task), copy.encode(obs, task)
    torch.testing.assert_close(z1, z2)
    normed = model.normalizer(obs, task)
    assert normed.mean(0).abs().max() < 1e-4 and (normed.std(0) - 1).abs().max() < 0.02


@pytest.mark.parametrize("spec_name", ["state", "pixels", "two_tasks"])
@pytest.mark.parametrize("static_sessions", [4, 1])
def test_the_exported_policy_acts_as_the_network_does(spec_name, static_sessions, monkeypatch):
    """PACPolicy runs the network in ONNX Runtime, one exported graph, a session per batch size
    (its shape fixed) up to STATIC_SESSIONS and the free-batch session past that: its logits
    are the eager network's, and greedy actions are identical, for every batch size it meets
    (a wave's envs end at different steps) and with a camera or padded tasks."""
    import dataclasses

    import numpy as np

    from policies.policy import OnnxPolicyLogits, PACPolicy, PolicyLogits
    from replay.spec import EnvSpec, TaskSpec
    from tests.fakes import PIXEL_SPEC

    monkeypatch.setattr(OnnxPolicyLogits, "STATIC_SESSIONS", static_sessions)

    spec = {"state": SPEC, "pixels": PIXEL_SPEC, "two_tasks": dataclasses.replace(
        SPEC, tasks=(*SPEC.tasks, TaskSpec("dm_control:other", ("x",), (2,), 1, "")))}[spec_name]
    assert isinstance(spec, EnvSpec)
    torch.manual_seed(0)
    model = PerceiverActorCritic(spec, TINY_MODEL).eval()
    policy = PACPolicy(model, 1, seed=0)
    eager = PolicyLogits(model)
    rng = np.random.default_rng(0)
    for batch in (3, 1, 16):
        obs = rng.normal(size=(batch, spec.obs_dim)).astype(np.float32) * 5
        task = np.arange(batch) % len(spec.tasks)
        pixels = rng.integers(0, 256, (batch, *spec.pixels_shape), np.uint8) \
            if spec.pixels_shape else None
        inputs = (torch.from_numpy(obs), torch.from_numpy(task)) + \
            ((torch.from_numpy(pixels),) if pixels is not None else ())
        with torch.no_grad():
            expected = eager(*inputs)
        exported = policy.policy_logits(obs, task, pixels)
        assert isinstance(exported, np.ndarray) and exported.shape == tuple(expected.shape)
        np.testing.assert_allclose(exported, expected.numpy(), atol=1e-5)
        bins = expected.argmax(-1)
        assert np.array_equal(policy.act(obs, task, True, pixels),
                              model.bins_to_action(bins).numpy())
    assert isinstance(policy._logits, OnnxPolicyLogits)  # not the torch fallback
    # batch 3 first: fixed; 1 and 16 fixed too while there is room, else the free-batch session
    assert set(policy._logits._sessions) == ({None, 3, 1, 16} if static_sessions == 4 else
                                             {None, 3})


def test_sampled_actions_follow_the_policy_softmax():
    """Gumbel-max sampling: each dimension's bin frequencies over many draws match its
    softmax (a wrong noise sign or scale moves them by far more than the tolerance), and the
    same seed draws the same actions."""
    import numpy as np

    from policies.policy import PACPolicy

    torch.manual_seed(1)
    model = PerceiverActorCritic(SPEC, TINY_MODEL).eval()
    K = TINY_MODEL.num_action_bins
    with torch.no_grad():  # logits -2..2 over the bins in every dimension: probabilities
        model.policy_head[1].weight.zero_()  # 0.01-0.64 for 5 bins, where a wrong sign or
        model.policy_head[1].bias.copy_(torch.linspace(-2, 2, K))  # scale of noise is off
    obs = np.random.default_rng(0).normal(size=(1, SPEC.obs_dim)).astype(np.float32)
    draws = 20_000
    batch = np.repeat(obs, draws, axis=0)
    policy = PACPolicy(model, 1, seed=3)
    actions = policy.act(batch, np.zeros(draws, np.int64), False)  # (draws, A)
    probs = torch.softmax(torch.from_numpy(policy.policy_logits(obs, np.zeros(1, np.int64))),
                          -1)[0].numpy()  # (A, K)
    centres = model.bin_centres.numpy()
    for d in range(SPEC.action_dim):
        freq = (actions[:, d, None] == centres[None, :]).mean(0)  # (K,)
        assert abs(freq.sum() - 1) < 1e-9  # every action is a bin centre
        np.testing.assert_allclose(freq, probs[d], atol=0.015)
        np.testing.assert_allclose(probs[d], torch.linspace(-2, 2, K).softmax(0), atol=1e-5)
    again = PACPolicy(model, 1, seed=3).act(batch[:64], np.zeros(64, np.int64), False)
    assert np.array_equal(again, actions[:64])


def test_a_network_over_the_onnx_limit_acts_in_torch_alike(monkeypatch):
    """Networks over ONNX_MAX_PARAMETERS (base, large) run in torch: same greedy actions, same
    sampled ones for the same seed, as the exported graph."""
    import numpy as np

    from policies import policy as policy_module

    torch.manual_seed(2)
    model = PerceiverActorCritic(SPEC, TINY_MODEL).eval()
    obs = np.random.default_rng(1).normal(size=(4, SPEC.obs_dim)).astype(np.float32)
    task = np.zeros(4, np.int64)
    exported = policy_module.PACPolicy(model, 1, seed=5)
    monkeypatch.setattr(policy_module, "ONNX_MAX_PARAMETERS", 0)
    in_torch = policy_module.PACPolicy(model, 1, seed=5)
    np.testing.assert_allclose(in_torch.policy_logits(obs, task),
                               exported.policy_logits(obs, task), atol=1e-5)
    assert not isinstance(in_torch._logits, policy_module.OnnxPolicyLogits)
    assert isinstance(exported._logits, policy_module.OnnxPolicyLogits)
    assert np.array_equal(in_torch.act(obs, task, True), exported.act(obs, task, True))
    assert np.array_equal(in_torch.act(obs, task, False), exported.act(obs, task, False))
