"""The Numba CPU kernels: layouts without copies, statistics against the reference, the work split
over channels and batch, thread counts. What every backend must do alike is in test_contract.py."""

import math

import numpy as np
import pytest
import torch

from bnlab.kernels import cpu
from kernel_cases import LAYOUTS, make
from tolerances import assert_statistics_within, assert_step_within, batch_norm_bounds


@pytest.mark.parametrize("name", LAYOUTS)
def test_rows_are_views_in_memory_order(name):
    x = make(name)
    rows = cpu._rows(x)
    assert np.shares_memory(
        rows, x.numpy() if x.is_contiguous() else x.permute(0, *range(2, x.dim()), 1).numpy()
    )
    assert rows.flags["C_CONTIGUOUS"]
    channel_first_value = rows[0, :, 0] if rows.ndim == 3 else rows[0]
    np.testing.assert_array_equal(
        channel_first_value, x.reshape(x.shape[0], x.shape[1], -1)[0, :, 0]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_statistics_match_reference(name, dtype):
    x = make(name, dtype)
    mean, var = cpu.statistics(x)
    assert_statistics_within(mean, var, x)


FAR_FROM_ZERO = {"nchw": (32, 4, 16, 16), "nhwc": (32, 4, 16, 16), "nc": (4096, 8)}


@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
@pytest.mark.parametrize("name", FAR_FROM_ZERO)
def test_float32_loops_keep_outputs_and_gradients_far_from_zero(name, activation):
    """float32 input at 1e4 + N(0, 1): the loops compute x - k with k the mean rounded to float32
    (exact there) and fold the rest back in float64, so y keeps ~1e-6 where (x - mean) * a in
    float32 (ATen's, the composite backend's) is off by ~6e-4."""
    gen = torch.Generator().manual_seed(0)
    x64 = 1e4 + torch.randn(FAR_FROM_ZERO[name], dtype=torch.float64, generator=gen)
    if name == "nhwc":
        x64 = x64.to(memory_format=torch.channels_last)
    x, dy = x64.float(), torch.randn(x64.shape, generator=gen)
    weight, bias = (
        torch.rand(x.shape[1], generator=gen) + 0.5,
        torch.randn(x.shape[1], generator=gen),
    )
    slope = 0.01 if activation == "leaky_relu" else 1.0
    y, mean, var = cpu.batch_norm_act_forward(
        x, weight, bias, None, None, True, 1e-5, activation, slope
    )
    dx, dw, db = cpu.batch_norm_act_backward(
        dy, x, weight, bias, mean, var, True, 1e-5, activation, slope
    )
    xr = x.double().requires_grad_()
    zr = torch.nn.functional.batch_norm(xr, None, None, weight.double(), bias.double(), True)
    yr = torch.nn.functional.leaky_relu(zr, slope)
    yr.backward(dy.double())
    assert (y.double() - yr).abs().max() < 5e-6
    # the backward gets the statistics in float32 (the mean off by up to 5e-4 here), which bounds
    # dx's accuracy (and moves the kink): checked away from the kink, at that level
    away = zr.detach().abs() > 1e-2
    assert (dx.double() - xr.grad)[away].abs().max() < 1e-3 * xr.grad.abs().max()
    torch.testing.assert_close(
        mean.double(), x.double().mean(dim=[d for d in range(x.dim()) if d != 1])
    )


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
    # the mean of N(0, 1) data can be near 0: its error is measured against the data's scale
    scale = x.abs().mean().item()
    np.testing.assert_allclose(mean, [x.mean().item()], rtol=0, atol=1e-13 * scale)
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
    truth, bounds = batch_norm_bounds(
        x, dy, None, None, None, None, training=True, momentum=None, eps=1e-5, dtype=x.dtype
    )
    for threads, (y, mean, var, dx, _, _) in zip((1, 2), results):
        assert_step_within(
            dict(out=y, mean=mean, var=var, dx=dx), truth, bounds, f"{threads} threads: "
        )


def test_first_kernel_call_keeps_torch_thread_setting():
    """Numba's OpenMP pool starts on the first call; torch.set_num_threads must survive it."""
    import subprocess
    import sys

    code = (
        "import torch, bnlab; torch.set_num_threads(1); "
        "bnlab.nn.BatchNorm2d(3, backend='cpu')(torch.randn(4, 3, 5, 5)); "
        "print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


# shapes whose NCS rows the kernels by channel take one channel a task (long rows) or several
# (short rows joined into ~2048 values), and the last group short
BY_CHANNEL_SHAPES = [(3, 12, 50, 47), (5, 19, 6, 7), (2, 24, 300)]


def _both_passes(x, dy, weight, bias, activation, param, from_output, training=True):
    y, mean, var = cpu.batch_norm_act_forward(
        x, weight, bias, None, None, True, 1e-5, activation, param
    )
    if not training:  # the backward of an eval step with these statistics as running ones
        mean, var = mean + 0.1, var * 1.5
    saved = y if from_output else x
    grads = cpu.batch_norm_act_backward(
        dy, saved, weight, bias, mean, var, training, 1e-5, activation, param,
        from_output=from_output,
    )  # fmt: skip
    return y, mean, var, *grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "activation,param,from_output",
    [
        ("identity", 1.0, False),
        ("relu", 0.0, False),
        ("leaky_relu", 0.1, True),
        ("elu", 0.7, True),
        ("silu", 0.0, False),
        ("gelu_tanh", 0.0, False),
    ],
)
@pytest.mark.parametrize("shape", BY_CHANNEL_SHAPES, ids=str)
def test_kernels_by_channel_match_the_two_pass_kernels(
    monkeypatch, shape, activation, param, from_output, dtype, training
):
    """The kernels by channel (both passes in one task) against the parallel kernels of one pass
    each: the same formulas, summed in another order."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    c = shape[1]
    weight = torch.linspace(0.5, 1.5, c, dtype=dtype)
    bias = torch.linspace(-1, 1, c, dtype=dtype)
    group = cpu._group_of(x)
    assert group and (group > 1) == (math.prod(shape[2:]) < 1024)
    results = {}
    for path, per_thread in (("by channel", cpu._CHANNELS_PER_THREAD), ("two pass", 10**9)):
        monkeypatch.setattr(cpu, "_CHANNELS_PER_THREAD", per_thread)
        assert bool(cpu._group_of(x)) == (path == "by channel")
        results[path] = _both_passes(x, dy, weight, bias, activation, param, from_output, training)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for ours, theirs in zip(*results.values(), strict=True):
        torch.testing.assert_close(ours, theirs, **tol)


def test_kernels_by_channel_do_not_depend_on_the_thread_count():
    """Each channel's sums run over its rows in order: 1 and 2 threads give the same bits (with
    channels grouped differently)."""
    gen = torch.Generator().manual_seed(4)
    x, dy = torch.randn(2, 2, 16, 9, 40, generator=gen)
    weight, bias = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
    results, groups = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            groups.append(cpu._group_of(x))
            assert groups[-1]
            results.append(_both_passes(x, dy, weight, bias, "relu", 0.0, False))
    finally:
        torch.set_num_threads(1)
    assert groups[0] != groups[1]
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_concatenation_backward_by_channel_matches_the_two_pass_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    buffer = torch.randn(4, 40, 10, 11, generator=gen)  # 24 of its channels normalized
    dy = torch.randn(4, 24, 10, 11, generator=gen)
    weight, bias = torch.rand(24, generator=gen) + 0.5, torch.randn(24, generator=gen)
    mean, var = cpu.concat_statistics(buffer, 0, 24)
    results = []
    for per_thread in (cpu._CHANNELS_PER_THREAD, 10**9):
        monkeypatch.setattr(cpu, "_CHANNELS_PER_THREAD", per_thread)
        results.append(
            cpu.batch_norm_concat_backward(
                dy,
                buffer,
                24,
                weight,
                bias,
                mean,
                var,
                True,
                1e-5,
                "relu",
                0.0,
                (True, True, True),
            )  # fmt: skip
        )
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    xr = buffer[:, :24].double().requires_grad_()
    zr = torch.nn.functional.batch_norm(xr, None, None, weight.double(), bias.double(), True)
    torch.nn.functional.relu(zr).backward(dy.double())
    torch.testing.assert_close(results[0][0].double(), xr.grad, rtol=1e-4, atol=1e-4)


def test_kernels_by_channel_take_vectors_of_another_dtype(monkeypatch):
    """float64 running statistics (and no weight) with float32 input: the vectors go to the
    kernels by channel in float64, the results match the two-pass kernels'."""
    gen = torch.Generator().manual_seed(6)
    x, dy = torch.randn(2, 3, 12, 20, 20, generator=gen)
    mean = torch.randn(12, generator=gen, dtype=torch.float64)
    var = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(12, generator=gen)
    assert cpu._group_of(x)
    results = []
    for per_thread in (cpu._CHANNELS_PER_THREAD, 10**9):
        monkeypatch.setattr(cpu, "_CHANNELS_PER_THREAD", per_thread)
        results.append(
            cpu.batch_norm_act_backward(dy, x, None, bias, mean, var, False, 1e-5, "relu", 0.0)
        )
    for ours, theirs in zip(*results, strict=True):
        if ours is None or theirs is None:
            assert ours is None and theirs is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "activation,param", [("identity", 1.0), ("relu", 0.0), ("leaky_relu", 0.2)]
)
@pytest.mark.parametrize("shape", BY_CHANNEL_SHAPES, ids=str)
def test_residual_unit_forward_by_channel_matches_the_two_pass_kernels(
    monkeypatch, shape, activation, param, dtype
):
    """act(batch_norm(x) + r) in training: the kernel by channel adds the residual in its second
    pass, as the two-pass path's normalizing kernel does, and both match float64 torch."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    r = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    c = shape[1]
    weight, bias = torch.linspace(0.5, 1.5, c, dtype=dtype), torch.linspace(-1, 1, c, dtype=dtype)
    results = []
    for by_channel, per_thread in ((True, cpu._CHANNELS_PER_THREAD), (False, 10**9)):
        monkeypatch.setattr(cpu, "_CHANNELS_PER_THREAD", per_thread)
        assert bool(cpu._group_of(x)) == by_channel
        results.append(
            cpu.batch_norm_act_forward(
                x, weight, bias, None, None, True, 1e-5, activation, param, residual=r
            )
        )
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, **tol)
    z = torch.nn.functional.batch_norm(x.double(), None, None, weight.double(), bias.double(), True)
    expected = torch.nn.functional.leaky_relu(z + r.double(), param)
    torch.testing.assert_close(results[0][0].double(), expected, **tol)


def _unit_backward_two_steps(
    dy, y, x, weight, bias, mean, var, training, activation, param, wanted
):
    """dz = dy act'(y), then the batch norm's backward of dz: what the residual unit's backward
    computes where the backend has no kernel for both."""
    dz = torch.ops.aten.leaky_relu_backward(dy, y, param, False)
    if activation == "relu":
        dz = torch.ops.aten.threshold_backward(dy, y, 0.0)
    grads = cpu.batch_norm_act_backward(
        dz, x, weight, bias, mean, var, training, 1e-5, "identity", 0.0, wanted
    )
    return (*grads, dz)


@pytest.mark.parametrize("wanted", [(True, True, True), (False, True, False)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("leaky_relu", 0.2)])
@pytest.mark.parametrize("shape", BY_CHANNEL_SHAPES, ids=str)
def test_residual_unit_backward_from_input_matches_the_two_steps(
    shape, activation, param, dtype, training, wanted
):
    """(dx, dweight, dbias, dresidual) of act(batch_norm(x) + r) by the one kernel over (x, y, dy)
    against dz = dy act'(y) by ATen and the batch norm's backward of dz; and against float64
    autograd."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    r, dy = torch.randn((2, *shape), generator=gen, dtype=torch.float64).to(dtype).unbind(0)
    c = shape[1]
    weight, bias = torch.linspace(0.5, 1.5, c, dtype=dtype), torch.linspace(-1, 1, c, dtype=dtype)
    y, mean, var = cpu.batch_norm_act_forward(
        x, weight, bias, None, None, True, 1e-5, activation, param, residual=r
    )
    if not training:  # an eval-mode backward with other statistics as the running ones
        mean, var = mean + 0.1, var * 1.5
    args = (weight, bias, mean, var, training, 1e-5, activation, param, list(wanted))
    ours = cpu.batch_norm_add_act_backward_from_input(dy, y, x, *args)
    assert ours is not None
    theirs = _unit_backward_two_steps(dy, y, x, *args[:5], activation, param, list(wanted))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5)
    for mine, other in zip(ours, theirs, strict=True):
        if other is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine, other, **tol)
    assert torch.equal(ours[3] == 0, theirs[3] == 0)  # relu's dz: exactly 0 where y <= 0
    if training and wanted[0]:
        xr = x.double().requires_grad_()
        zr = torch.nn.functional.batch_norm(xr, None, None, weight.double(), bias.double(), True)
        torch.nn.functional.leaky_relu(zr + r.double(), param).backward(dy.double())
        torch.testing.assert_close(ours[0].double(), xr.grad, rtol=1e-4, atol=1e-4)


def test_residual_unit_backward_from_input_declines_what_it_does_not_take():
    """identity (dz is dy itself) and inputs whose NCS view the kernels by channel do not take
    (channels_last here) go to the caller's two steps."""
    gen = torch.Generator().manual_seed(9)
    x, y, dy = torch.randn(3, 4, 16, 8, 8, generator=gen).unbind(0)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    args = (None, None, mean, var, True, 1e-5)
    assert cpu.batch_norm_add_act_backward_from_input(dy, y, x, *args, "relu", 0.0, [True] * 3)
    declined = cpu.batch_norm_add_act_backward_from_input(
        dy, y, x, *args, "identity", 1.0, [True] * 3
    )
    assert declined is None
    cl = x.contiguous(memory_format=torch.channels_last)
    assert (
        cpu.batch_norm_add_act_backward_from_input(dy, y, cl, *args, "relu", 0.0, [True] * 3)
        is None
    )
