"""What every fast backend (the Numba CPU kernels, the Triton kernels) must do alike, checked
against the composite backend and the float64 reference: every layout x activation x dtype x
train/eval, accurate statistics far from zero, non-finite batches, the in-place mode's backward from
the output, a gradient in another layout. Backend-specific checks (views, splits, threads,
compilation) live in test_cpu.py and test_gpu.py."""

import numpy as np
import pytest
import torch

import kernel_cases
from bnlab import reference
from bnlab.checks import ACTIVATIONS, INVERTIBLE_ACTIVATIONS
from bnlab.kernels import composite, cpu
from bnlab.kernels import gpu as gpu
from kernel_cases import ACT_CASES, LAYOUTS, assert_results_close
from tolerances import assert_step_within, batch_norm_bounds

DEVICES = {"cpu": "cpu", "gpu": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.fixture(params=["cpu", "gpu"])
def backend(request, monkeypatch):
    """(kernels module, device). Triton's reductions are cut into as many programs as there are
    tiles, so every merge path runs."""
    if request.param == "gpu":
        monkeypatch.setattr(gpu, "_programs", lambda device: 1 << 20)
        return gpu, DEVICES["gpu"]
    return cpu, DEVICES["cpu"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param", ACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_composite_backend(backend, name, dtype, activation, param, training):
    kernels, device = backend
    x, dy = (kernel_cases.make(name, dtype, seed, device=device) for seed in (0, 1))
    w, b, rm, rv = kernel_cases.params(x.shape[1], dtype, device)
    args = (w, b, rm, rv, training, 1e-5, activation, param)
    ours, theirs = (
        kernels.batch_norm_act_forward(x, *args),
        composite.batch_norm_act_forward(x, *args),
    )
    assert ours[0].stride() == x.stride()
    if dtype == torch.float64:
        assert_results_close(ours, theirs, dict(atol=1e-12, rtol=1e-12))
    backward = []
    for k, forward in ((kernels, ours), (composite, theirs)):
        mean, var = (forward[1], forward[2]) if training else (rm, rv)
        backward.append(
            k.batch_norm_act_backward(dy, x, w, b, mean, var, training, 1e-5, activation, param)
        )
    if dtype == torch.float64:
        assert_results_close(*backward, dict(atol=1e-12, rtol=1e-12))
        return
    # float32: each within the derived bound of the float64 truth (tests/tolerances.py)
    stats = (None, None) if training else (rm.cpu(), rv.cpu())  # kernels update no running stats
    truth, bounds = batch_norm_bounds(
        x.cpu(),
        dy.cpu(),
        w.cpu(),
        b.cpu(),
        *stats,
        training=training,
        momentum=None,
        eps=1e-5,
        dtype=dtype,
        activation=activation,
        param=param,
    )
    keys = ("out", "mean", "var") if training else ("out",)
    for name, forward, grads in (
        ("kernels", ours, backward[0]),
        ("composite", theirs, backward[1]),
    ):
        results = dict(zip(keys, [t.cpu() for t in forward]))
        results.update(zip(("dx", "dweight", "dbias"), [t.cpu() for t in grads]))
        assert_step_within(results, truth, bounds, f"{name} ")


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((32, 4, 16, 16), torch.contiguous_format),
        ((32, 4, 16, 16), torch.channels_last),
        ((4096, 8), torch.contiguous_format),
    ],
)
def test_statistics_stay_accurate_far_from_zero(backend, shape, fmt):
    """float32 1e4 + N(0, 1): variance within 1e-3 relative, where E[x^2] - E[x]^2 fails."""
    kernels, device = backend
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(shape, generator=g, dtype=torch.float64)).float()
    x = x.to(device).contiguous(memory_format=fmt)
    dims = [0, *range(2, x.dim())]
    exact = x.double().var(dims, unbiased=False)  # of the float32 values themselves
    _, _, var = kernels.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    assert (var.double() / exact - 1).abs().max() <= 1e-3
    naive = (x.square().mean(dims) - x.mean(dims).square()).double()
    assert (naive / exact - 1).abs().max() > 1e-3  # the test can tell the difference


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter
@pytest.mark.parametrize("name", ["nchw", "nhwc"])
def test_statistics_of_a_non_finite_batch_are_not_finite(backend, name):
    kernels, device = backend
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = kernel_cases.make(name, device=device)
        x[1, 2, 3, 4] = bad
        _, mean, var = kernels.batch_norm_forward(x, None, None, None, None, True, 1e-5)
        assert not (torch.isfinite(mean[2]) and torch.isfinite(var[2]))
        assert torch.isfinite(mean[[0, 1, 3, 4]]).all() and torch.isfinite(var[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize(
    "activation,param", [a for a in ACT_CASES if a[0] in INVERTIBLE_ACTIVATIONS]
)
@pytest.mark.parametrize("name", ["nchw", "nhwc", "nc"])
def test_backward_from_the_output_equals_backward_from_the_input(backend, name, activation, param):
    kernels, device = backend
    x, dy = (kernel_cases.make(name, seed=seed, device=device) for seed in (0, 1))
    w, b, _, _ = kernel_cases.params(x.shape[1], x.dtype, device)
    y = x.clone()
    out, mean, var = kernels.batch_norm_act_forward(
        y, w, b, None, None, True, 1e-5, activation, param, out=y
    )
    assert out is y and not torch.equal(y, x)
    from_x = kernels.batch_norm_act_backward(dy, x, w, b, mean, var, True, 1e-5, activation, param)
    from_y = kernels.batch_norm_act_backward(
        dy, y, w, b, mean, var, True, 1e-5, activation, param, from_output=True
    )
    assert_results_close(from_x, from_y, dict(atol=1e-10, rtol=1e-10))


def test_every_backend_runs_every_activation():
    """The names bnlab.checks accepts are the ones every backend's tables know."""
    assert set(ACTIVATIONS) == {name for name, _ in ACT_CASES}
    assert set(gpu.ACTIVATION_CODES) == set(ACTIVATIONS)
    assert len(set(gpu.ACTIVATION_CODES.values())) == len(ACTIVATIONS)
    cpu_codes = {name: cpu.activation_code(name, 0.5) for name in ACTIVATIONS}
    linear = {name for name, (code, _) in cpu_codes.items() if code == cpu._LINEAR}
    assert linear == {"identity", "relu", "leaky_relu"}
    assert len({code for code, _ in cpu_codes.values()}) == len(ACTIVATIONS) - 2
    z = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for name in ACTIVATIONS:  # composite's tables too (their values: test_functional_act.py)
        assert composite.activate(z, name, 0.5).shape == z.shape
        assert composite.activation_grad(z, z, name, 0.5).shape == z.shape


@pytest.mark.parametrize("activation", [a for a, _ in ACT_CASES if a not in INVERTIBLE_ACTIVATIONS])
def test_backward_from_the_output_refuses_what_it_cannot_invert(backend, activation):
    """relu, silu, gelu, ... map two inputs to one output: the in-place mode's backward cannot
    recover z from y, and says so instead of treating y as z."""
    kernels, device = backend
    y, dy = (kernel_cases.make("nchw", seed=seed, device=device) for seed in (0, 1))
    w, b, rm, rv = kernel_cases.params(y.shape[1], y.dtype, device)
    for k in (kernels, composite):
        with pytest.raises(ValueError, match=rf"'{activation}' is not invertible.*'elu'"):
            k.batch_norm_act_backward(
                dy, y, w, b, rm, rv, True, 1e-5, activation, 0.0, from_output=True
            )


def test_grad_out_in_another_layout(backend):
    kernels, device = backend
    x = kernel_cases.make("nhwc", device=device)
    dy = kernel_cases.make("nhwc", seed=1, device=device).contiguous()  # NCHW gradient, NHWC input
    _, mean, var = kernels.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    dx, _, _ = kernels.batch_norm_backward(dy, x, None, mean, var, True, 1e-5)
    _, cache = reference.spatial_batchnorm_forward(x.cpu().numpy(), np.ones(5), np.zeros(5), 1e-5)
    expected, _, _ = reference.spatial_batchnorm_backward(dy.cpu().numpy(), cache)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(dx.cpu().numpy(), expected, atol=1e-10, rtol=1e-10)
