"""PAC loss pieces against hand-computed values."""

import math

import pytest
import torch

from learners import losses


def test_categorical_log_prob_sums_dimensions():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # (1, A=2, K=3)
    bins = torch.tensor([[0, 2]])
    assert losses.categorical_log_prob(logits, bins).item() == pytest.approx(math.log(0.5 * 0.8))


def test_categorical_log_prob_broadcasts_over_samples():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))  # (1, A=2, K=2)
    bins = torch.tensor([[[0, 0], [1, 1]]])  # (1, N=2, A=2)
    out = losses.categorical_log_prob(logits.unsqueeze(1), bins)
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(math.log(0.45))
    assert out[0, 1].item() == pytest.approx(math.log(0.05))


def test_bc_only_loss_equals_negative_log_likelihood():
    logits = torch.log(torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]]))  # (B=2, A=1, K=2)
    data = torch.tensor([[1], [0]])
    l_bc = losses.behaviour_cloning_loss(logits, data)
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert l_bc.item() == pytest.approx(expected)
    total = losses.pac_loss(torch.tensor(7.0), l_bc, torch.tensor(5.0), torch.tensor(0.0),
                            alpha=1.0, beta=0.0)
    assert total.item() == pytest.approx(expected)


def test_projection_worked_example_keeps_mass_and_mean():
    support = torch.arange(5, dtype=torch.float32)  # 0..4
    atoms = (0.25 + 0.5 * support).unsqueeze(0)  # 0.25, 0.75, 1.25, 1.75, 2.25
    probs = torch.full((1, 5), 0.2)
    out = losses.categorical_projection(atoms, probs, support)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.4, 0.35, 0.05, 0.0]]))
    assert out.sum().item() == pytest.approx(1.0)
    assert (out * support).sum().item() == pytest.approx(1.25)  # mean of the atoms


def test_projection_clips_to_the_support_edges():
    support = torch.arange(5, dtype=torch.float32)
    atoms = torch.tensor([[-3.0, 0.0, 2.0, 4.0, 9.0]])
    out = losses.categorical_projection(atoms, torch.full((1, 5), 0.2), support)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.0, 0.2, 0.0, 0.4]]))


def test_n_step_return_full_window():
    r = losses.n_step_return(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.ones(1, 3),
                             gamma=0.5)
    assert r.partial_return.item() == pytest.approx(1 + 0.5 * 2 + 0.25 * 3)
    assert r.bootstrap_discount.item() == pytest.approx(0.125)
    assert r.bootstrap_index.item() == 3


def test_n_step_return_termination_stops_bootstrap():
    # Episode terminates after the 2nd transition (discount 0); record 2 is the final one.
    r = losses.n_step_return(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                             torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.5)
    assert r.partial_return.item() == pytest.approx(2.0)
    assert r.bootstrap_discount.item() == 0.0
    assert r.bootstrap_index.item() == 2


def test_n_step_return_truncation_bootstraps_from_final_observation():
    r = losses.n_step_return(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                             torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.5)
    assert r.partial_return.item() == pytest.approx(2.0)
    assert r.bootstrap_discount.item() == pytest.approx(0.25)
    assert r.bootstrap_index.item() == 2


def test_improved_policy_is_prior_times_exp_q_over_eta():
    prior = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))  # (B=1, A=1, K=3)
    q = torch.tensor([[[0.0, math.log(2.0), 0.0]]])
    out = losses.improved_log_probs(prior, q, torch.tensor(1.0)).exp()
    torch.testing.assert_close(out, torch.tensor([[[0.4, 0.4, 0.2]]]))


def test_candidates_vary_one_dimension_over_every_bin():
    context = torch.tensor([[[1, 2, 0]]])  # (B=1, N=1, A=3)
    out = losses.per_dimension_candidates(context, num_bins=4)  # (1, 1, 3, 4, 3)
    for d in range(3):
        for k in range(4):
            expected = context[0, 0].clone()
            expected[d] = k
            assert out[0, 0, d, k].tolist() == expected.tolist(), (d, k)


def test_a_rare_bin_with_high_q_gains_probability():
    """Support collapse: bin 3 has 1e-4 probability under π_θ' but the highest Q. A sampled
    E-step with N=10 draws it about once in a thousand states; the exact one always scores it,
    and a few M-step gradient steps raise its probability by orders of magnitude."""
    K = 5
    prior = torch.log(torch.tensor([0.5, 0.3, 0.1999, 1e-4, 1e-8]))
    prior = prior.expand(8, 2, K).clone()  # (B=8, A=2, K) two dimensions, both collapsed
    q = torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0]).expand(8, 2, K)  # bin 3 is the best
    logits = prior.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(50):  # the prior follows the policy, as π_θ' follows π_θ
        improved = losses.improved_log_probs(logits.detach(), q, torch.tensor(0.5))
        optimizer.zero_grad()
        losses.policy_improvement_loss(logits, improved).backward()
        optimizer.step()
    p_before = prior.softmax(-1)[..., 3]
    p_after = logits.detach().softmax(-1)[..., 3]
    assert (p_after > 100 * p_before).all()
    assert (p_after > 0.5).all()  # and it becomes the mode


@pytest.mark.parametrize("epsilon,direction", [(10.0, -1), (1e-4, +1)])
def test_temperature_dual_moves_eta_towards_the_kl_bound(epsilon, direction):
    # dg/dη = ε - KL(π_imp || π_θ') per dimension: with KL below ε a descent step lowers η.
    prior = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]))
    q = torch.tensor([[[0.0, 1.0, 2.0, 5.0]]])
    eta = torch.tensor(1.0, requires_grad=True)
    losses.temperature_dual_loss(prior, q, eta, epsilon).backward()
    improved = losses.improved_log_probs(prior, q, torch.tensor(1.0))
    kl = losses.categorical_kl(improved, prior).item()
    assert eta.grad.item() == pytest.approx(epsilon - kl, rel=1e-4)
    assert -math.copysign(1, eta.grad.item()) == direction


def test_improvement_loss_leaves_out_padded_dimensions():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    improved = torch.randn(2, 3, 4).log_softmax(-1)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    losses.policy_improvement_loss(logits, improved, mask).backward()
    assert torch.count_nonzero(logits.grad[0, 2]) == 0
    assert torch.count_nonzero(logits.grad[1, 1:]) == 0
    assert torch.count_nonzero(logits.grad[0, :2]) == 8


def test_critic_loss_is_cross_entropy():
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    target = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert losses.critic_loss(logits, target).item() == pytest.approx(expected)


def test_hl_gauss_is_the_gaussian_mass_of_each_bin():
    support = torch.arange(5, dtype=torch.float32)  # bins [-0.5, 0.5), ..., [3.5, 4.5)
    out = losses.hl_gauss_projection(torch.tensor([2.0]), support, sigma=0.5)
    normal = torch.distributions.Normal(2.0, 0.5)
    edges = torch.tensor([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5])
    mass = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    torch.testing.assert_close(out[0], mass / mass.sum())
    assert out.sum().item() == pytest.approx(1.0)
    assert (out * support).sum().item() == pytest.approx(2.0, abs=1e-5)  # symmetric: mean kept


def test_polyak_update_moves_target_by_tau():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = target.weight.detach().clone()
    losses.polyak_update(target, online, tau=0.25)
    torch.testing.assert_close(target.weight, 0.75 * before + 0.25 * online.weight)


def test_entropy_floor_raises_entropy_below_the_floor_and_its_multiplier_follows():
    logits = torch.tensor([[[4.0, 0.0, 0.0, 0.0]]], requires_grad=True)  # H ≈ 0.2 nats
    psi = torch.tensor(0.0, requires_grad=True)
    multiplier = torch.nn.functional.softplus(psi)
    loss = losses.entropy_floor_loss(logits, multiplier, min_entropy=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the two terms cancel in value
    loss.backward()
    h_before = losses.categorical_entropy(logits.detach()).item()
    h_after = losses.categorical_entropy(logits.detach() - 0.1 * logits.grad).item()
    assert h_after > h_before  # a descent step makes the policy more random
    assert psi.grad.item() < 0  # below the floor: the multiplier grows
    psi.grad = None
    losses.entropy_floor_loss(torch.zeros(1, 1, 4), torch.nn.functional.softplus(psi),
                              min_entropy=1.0).backward()  # uniform: H = ln 4 > 1
    assert psi.grad.item() > 0  # above the floor: the multiplier shrinks
