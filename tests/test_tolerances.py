"""The derived bounds of tests/tolerances.py: loose enough for any correct float32 summation order,
tight enough that a wrong formula or a lower precision fails them."""

import pytest
import torch

from tolerances import assert_step_within, assert_within, batch_norm_bounds

SHAPES = [(2, 3), (60, 100), (8, 16, 5, 5), (4, 3, 2, 5, 5)]


def case(shape, seed=0, loc=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + loc
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    w, b = (
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(c, generator=g, dtype=torch.float64),
    )
    return x.float(), dy.float(), w.float(), b.float()


def float32_step(x, dy, w, b, order):
    """Batch norm in float32 with the sums taken in a chosen order (as another vector width or
    thread split would): "forward" or "reversed" rows."""
    x, dy = x.clone(), dy.clone()
    if order == "reversed":
        x, dy = x.flip(0), dy.flip(0)
    x.requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = torch.nn.functional.batch_norm(x, None, None, wl, bl, True)
    out.backward(dy)
    flip = (lambda t: t.flip(0)) if order == "reversed" else (lambda t: t)
    return dict(out=flip(out.detach()), dx=flip(x.grad), dweight=wl.grad, dbias=bl.grad)


@pytest.mark.parametrize("order", ["forward", "reversed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_results_in_any_order_are_within(shape, order):
    x, dy, w, b = case(shape)
    truth, bounds = batch_norm_bounds(
        x, dy, w, b, None, None, training=True, momentum=0.1, eps=1e-5, dtype=torch.float32
    )
    assert_step_within(float32_step(x, dy, w, b, order), truth, bounds)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_unbiased_variance_in_the_output_fails(shape):
    """A classic bug (normalizing with var * m / (m - 1)) is far outside the bound."""
    x, dy, w, b = case(shape)
    truth, bounds = batch_norm_bounds(
        x, dy, w, b, None, None, training=True, momentum=0.1, eps=1e-5, dtype=torch.float32
    )
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, -1] + [1] * (x.dim() - 2)
    wrong = (x - x.mean(dims, keepdim=True)) / (x.var(dims, keepdim=True) + 1e-5).sqrt()
    wrong = wrong * w.view(view) + b.view(view)
    with pytest.raises(AssertionError, match="outside the derived bound"):
        assert_within(wrong, truth["out"], bounds["out"], "out")


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_bfloat16_arithmetic_fails_the_float32_bound(shape):
    """The float32 bound tells float32 arithmetic from a lower precision: a dweight summed in
    bfloat16 (then widened back) misses it."""
    x, dy, w, b = case(shape)
    truth, bounds = batch_norm_bounds(
        x, dy, w, b, None, None, training=True, momentum=0.1, eps=1e-5, dtype=torch.float32
    )
    low = float32_step(x.bfloat16().float(), dy, w, b, "forward")
    with pytest.raises(AssertionError, match="outside the derived bound"):
        assert_step_within(low, truth, bounds)


def test_a_nan_fails():
    truth = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="outside"):
        assert_within(
            torch.tensor([0.0, float("nan"), 0.0]), truth, torch.ones(3, dtype=torch.float64)
        )
