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


def test_improvement_weights_are_softmax_of_q_over_eta():
    q = torch.tensor([[0.0, math.log(3.0)]])
    w = losses.improvement_weights(q, torch.tensor(1.0))
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]]))


@pytest.mark.parametrize("epsilon,direction", [(10.0, -1), (1e-4, +1)])
def test_temperature_dual_moves_eta_towards_the_kl_bound(epsilon, direction):
    # dg/deta = epsilon - KL(w || uniform): with KL below epsilon a descent step lowers eta.
    q = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    eta = torch.tensor(1.0, requires_grad=True)
    losses.temperature_dual_loss(q, eta, epsilon).backward()
    w = losses.improvement_weights(q, torch.tensor(1.0))
    kl = (w * torch.log(w * 4)).sum().item()
    assert eta.grad.item() == pytest.approx(epsilon - kl, rel=1e-4)
    assert -math.copysign(1, eta.grad.item()) == direction


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
