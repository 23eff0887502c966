"""Running observation statistics: the merge is exact for any batch split."""

import torch

from policies.normalization import (BatchMoments, ObservationNormalizer, batch_moments,
                                    merge_moments)


def test_merging_batches_equals_the_statistics_of_all_the_data():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(300, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5, 20, 0.1])
    task = torch.randint(0, 3, (300,), generator=g)
    count, mean, var = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 4).double(), \
        torch.ones(3, 4).double()
    for chunk in torch.split(torch.arange(300), [7, 100, 1, 192]):
        count, mean, var = merge_moments(count, mean, var,
                                         batch_moments(obs[chunk], task[chunk], 3))
    for t in range(3):
        x = obs[task == t]
        assert count[t] == len(x)
        torch.testing.assert_close(mean[t], x.mean(0))
        torch.testing.assert_close(var[t], x.var(0, unbiased=False))


def test_a_task_absent_from_a_batch_keeps_its_statistics():
    norm = ObservationNormalizer(num_tasks=2, obs_dim=3)
    norm.update(batch_moments(torch.randn(10, 3) + 5, torch.zeros(10, dtype=torch.long), 2))
    before = norm.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    norm.update(batch_moments(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), 2))
    assert torch.equal(norm.count[1], before["count"][1]) and norm.count[1] == 0
    torch.testing.assert_close(norm.mean[1], before["mean"][1])
    torch.testing.assert_close(norm.var[1], before["var"][1])
    assert norm.count[0] == 20


def test_summed_moments_of_two_replicas_equal_one_big_batch():
    obs, task = torch.randn(40, 2), torch.zeros(40, dtype=torch.long)
    a, b = batch_moments(obs[:20], task[:20], 1), batch_moments(obs[20:], task[20:], 1)
    summed = BatchMoments(*(x + y for x, y in zip(a, b)))
    whole = batch_moments(obs, task, 1)
    for x, y in zip(summed, whole):
        torch.testing.assert_close(x, y)
