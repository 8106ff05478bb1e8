"""The running-statistics rules of bnlab.statistics: Chan's merge, checked against whole batches;
when updates may wait."""

import pytest
import torch

import bnlab
from bnlab.statistics import may_defer_eagerly, merge_statistics

# --------------------------------------------------------------------------------------------
# merge_statistics
# --------------------------------------------------------------------------------------------


def _parts(sizes, c=3, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), c, generator=g, dtype=torch.float64) * 2 + offset
    counts, means, m2s = [], [], []
    for part in x.split(list(sizes)):
        counts.append(float(part.shape[0]))
        mean = part.mean(0) if part.shape[0] else torch.zeros(c, dtype=torch.float64)
        means.append(mean)
        m2s.append(((part - mean) ** 2).sum(0))
    return x, torch.tensor(counts, dtype=torch.float64), torch.stack(means), torch.stack(m2s)


@pytest.mark.parametrize("sizes", [(5,), (4, 7), (5, 0, 3), (0, 6, 0, 1), (1, 1)], ids=str)
def test_merge_statistics_equals_whole_batch(sizes):
    x, counts, means, m2s = _parts(sizes)
    n, mean, m2 = merge_statistics(counts, means, m2s)
    assert float(n) == sum(sizes)
    var = m2 / n
    torch.testing.assert_close(mean, x.mean(0), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(var, x.var(0, correction=0), atol=1e-13, rtol=1e-13)


def test_merge_statistics_is_stable_far_from_zero():
    # float32 parts 1e4 away from zero with spread 1: E[x^2] - E[x]^2 would lose every digit
    x, counts, means, m2s = _parts((300, 500, 200), offset=1e4, seed=1)
    n, mean, m2 = merge_statistics(counts.float(), means.float(), m2s.float())
    var = m2 / n
    torch.testing.assert_close(var.double(), x.var(0, correction=0), atol=0, rtol=1e-4)
    torch.testing.assert_close(mean.double(), x.mean(0), atol=0, rtol=1e-6)


def test_merge_statistics_of_nothing_is_empty():
    n, mean, m2 = merge_statistics(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    assert float(n) == 0 and (mean == 0).all() and (m2 == 0).all()


def test_merge_statistics_with_counts_per_channel():
    # counts (P, C): what population statistics merge, channel by channel
    x, counts, means, m2s = _parts((4, 7))
    n, mean, m2 = merge_statistics(counts.unsqueeze(1).expand(-1, 3), means, m2s)
    torch.testing.assert_close(n, torch.full((3,), 11.0, dtype=torch.float64))
    torch.testing.assert_close(m2 / n, x.var(0, correction=0), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(mean, x.mean(0), atol=1e-13, rtol=1e-13)


def test_may_defer_eagerly_inside_accumulate_and_a_checkpoint_recomputation_only():
    """The eager path's quick test is True wherever an update may have to wait (an open
    accumulate, whatever it holds; a checkpointed forward recomputed in the backward) and False
    in a plain forward."""
    seen = []
    layer = torch.nn.Linear(3, 3)

    def forward(x):
        seen.append(may_defer_eagerly())
        return layer(x)

    assert not may_defer_eagerly()
    with bnlab.accumulate(torch.nn.BatchNorm1d(3)):
        assert may_defer_eagerly()
    assert not may_defer_eagerly()
    x = torch.randn(4, 3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False).sum().backward()
    assert seen == [False, True]  # the forward, then its recomputation in the backward
