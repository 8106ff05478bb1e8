"""The Numba CPU kernels: layouts without copies, accurate statistics far from zero, the work split
over channels and batch, and agreement with the composite backend on every op variant."""

import numpy as np
import pytest
import torch

from bnlab import reference
from bnlab.functional import INVERTIBLE_ACTIVATIONS
from bnlab.kernels import cpu, torch_ops
from kernel_cases import ACT_CASES, LAYOUTS, make, params


@pytest.mark.parametrize("name", LAYOUTS)
def test_rows_are_views_in_memory_order(name):
    x = make(name)
    rows = cpu._rows(x)
    assert np.shares_memory(rows, x.numpy() if x.is_contiguous() else x.permute(
        0, *range(2, x.dim()), 1).numpy())
    assert rows.flags["C_CONTIGUOUS"]
    channel_first_value = rows[0, :, 0] if rows.ndim == 3 else rows[0]
    np.testing.assert_array_equal(channel_first_value, x.reshape(x.shape[0], x.shape[1], -1)[0, :, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_statistics_match_reference(name, dtype):
    x = make(name, dtype)
    mean, var = cpu.statistics(x)
    xs = x.double().numpy()
    dims = tuple(d for d in range(xs.ndim) if d != 1)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # float64 accumulation either way
    np.testing.assert_allclose(mean, xs.mean(axis=dims), rtol=tol, atol=tol)
    np.testing.assert_allclose(var, xs.var(axis=dims), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,fmt", [((32, 4, 16, 16), torch.contiguous_format),
                                       ((32, 4, 16, 16), torch.channels_last),
                                       ((4096, 8), torch.contiguous_format)])
def test_statistics_stay_accurate_far_from_zero(shape, fmt):
    """float32 1e4 + N(0, 1): variance within 1e-3 relative, where E[x^2] - E[x]^2 fails."""
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(shape, generator=g, dtype=torch.float64)).float().contiguous(memory_format=fmt)
    dims = [0, *range(2, x.dim())]
    exact = x.double().var(dims, unbiased=False).numpy()  # of the float32 values themselves
    _, var = cpu.statistics(x)
    assert np.abs(var / exact - 1).max() <= 1e-3
    naive = (x.square().mean(dims) - x.mean(dims).square()).double().numpy()
    assert np.abs(naive / exact - 1).max() > 1e-3  # the test can tell the difference


@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_statistics_of_a_non_finite_batch_are_not_finite(name):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = make(name)
        x[1, 2, 3, 4] = bad
        _, mean, var = cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
        assert not (torch.isfinite(mean[2]) and torch.isfinite(var[2]))
        assert torch.isfinite(mean[[0, 1, 3, 4]]).all() and torch.isfinite(var[[0, 1, 3, 4]]).all()


def test_few_channels_still_split_over_the_batch_and_space():
    x = torch.randn(2, 1, 96, 96, dtype=torch.float64)
    torch.set_num_threads(2)
    try:
        assert cpu._Plan(x).blocks > 1
        few_channels = cpu._Plan(torch.randn(4096, 3))
        assert few_channels.blocks > 1 and few_channels.k > 1  # rows of 3 joined into long ones
    finally:
        torch.set_num_threads(1)
    mean, var = cpu.statistics(x)
    np.testing.assert_allclose(mean, [x.mean().item()], rtol=1e-12)
    np.testing.assert_allclose(var, [x.var(unbiased=False).item()], rtol=1e-12)


@pytest.mark.parametrize("name", ["nchw", "nhwc", "nc"])
def test_thread_count_does_not_change_results(name):
    x = make(name, torch.float32)
    dy = make(name, torch.float32, seed=1)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, mean, var = cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
        results.append((y, mean, var, *cpu.batch_norm_backward(dy, x, None, mean, var, True, 1e-5)))
    torch.set_num_threads(1)
    for one, two in zip(*results):
        if one is not None:
            torch.testing.assert_close(one, two, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_composite_backend(name, dtype, activation, param, training):
    x, dy = make(name, dtype), make(name, dtype, seed=1)
    w, b, rm, rv = params(x.shape[1], dtype)
    args = (w, b, rm, rv, training, 1e-5, activation, param)
    ours, theirs = cpu.batch_norm_act_forward(x, *args), torch_ops.batch_norm_act_forward(x, *args)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, **tol)
    assert ours[0].stride() == x.stride()
    mean, var = (ours[1], ours[2]) if training else (rm, rv)
    grads = [k.batch_norm_act_backward(dy, x, w, b, mean, var, training, 1e-5, activation, param)
             for k in (cpu, torch_ops)]
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, **tol)


@pytest.mark.parametrize("activation,param", [a for a in ACT_CASES if a[0] in INVERTIBLE_ACTIVATIONS])
@pytest.mark.parametrize("name", ["nchw", "nhwc", "nc"])
def test_backward_from_the_output_equals_backward_from_the_input(name, activation, param):
    x, dy = make(name), make(name, seed=1)
    w, b, _, _ = params(x.shape[1], x.dtype)
    y = x.clone()
    out, mean, var = cpu.batch_norm_act_forward(y, w, b, None, None, True, 1e-5, activation, param,
                                                out=y)
    assert out is y and not torch.equal(y, x)
    from_x = cpu.batch_norm_act_backward(dy, x, w, b, mean, var, True, 1e-5, activation, param)
    from_y = cpu.batch_norm_act_backward(dy, y, w, b, mean, var, True, 1e-5, activation, param,
                                         from_output=True)
    for a, b_ in zip(from_x, from_y):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=1e-10)


def test_grad_out_in_another_layout():
    x = make("nhwc")
    dy = make("nhwc", seed=1).contiguous()  # NCHW gradient for a channels_last input
    y, mean, var = cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    dx, _, _ = cpu.batch_norm_backward(dy, x, None, mean, var, True, 1e-5)
    _, cache = reference.spatial_batchnorm_forward(x.numpy(), np.ones(5), np.zeros(5), 1e-5)
    expected, _, _ = reference.spatial_batchnorm_backward(dy.numpy(), cache)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(dx.numpy(), expected, atol=1e-10, rtol=1e-10)


def test_first_kernel_call_keeps_torch_thread_setting():
    """Numba's OpenMP pool starts on the first call; torch.set_num_threads must survive it."""
    import subprocess
    import sys

    code = ("import torch, bnlab; torch.set_num_threads(1); "
            "bnlab.nn.BatchNorm2d(3, backend='numba')(torch.randn(4, 3, 5, 5)); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
