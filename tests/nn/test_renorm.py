"""BatchRenorm against bnlab's BatchNorm (exactly, while r = 1 and d = 0) and against a float64
NumPy transcription of Ioffe 2017, Algorithm 1 (once the schedule lets r and d move)."""

import copy

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference
from bnlab.nn.renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from tolerances import FORWARD, GRADIENT, assert_close, assert_rounded_once, run, to_numpy

SHAPES = [(6, 3), (5, 3, 4), (4, 3, 5, 5), (3, 3, 2, 3, 4)]
LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}
RENORM = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}
AFFINE = {"affine": {}, "noaffine": {"affine": False}, "nobias": {"bias": False}}
RELAXED = dict(warmup_steps=0, r_max_steps=0, d_max_steps=0)  # the final limits from step 0 on
PAST_SCHEDULE = 10**6


def shape_layouts():
    for shape in SHAPES:
        yield shape, "contiguous"
        if len(shape) in LAYOUTS:
            yield shape, "channels_last"


def make_input(shape, layout, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=LAYOUTS[len(shape)])
    return x.requires_grad_(requires_grad)


def randomize(module, seed=0):
    """Non-trivial parameters and running statistics (far from a batch's: r, d matter)."""
    g = torch.Generator().manual_seed(seed)
    c = module.num_features
    with torch.no_grad():
        for p in (module.weight, module.bias):
            if p is not None:
                p.copy_(torch.rand(c, generator=g) + 0.5)
        module.running_mean.copy_(torch.randn(c, generator=g))
        module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return module


# ---------------------------------------------------------------------------------------------
# r = 1, d = 0: exactly BatchNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("momentum", [0.01, None])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("plain", ["limits_1_0", "warmup"])
@pytest.mark.parametrize("shape,layout", list(shape_layouts()), ids=str)
def test_plain_renorm_is_batchnorm_exactly(shape, layout, plain, affine, momentum, dtype):
    if plain == "limits_1_0":  # r_max = 1, d_max = 0 past the schedule
        kwargs, start = dict(r_max=1.0, d_max=0.0), PAST_SCHEDULE
    else:  # the default schedule, still in its warm-up
        kwargs, start = {}, 4998
    c = shape[1]
    ours = randomize(BatchRenorm(c, momentum=momentum, dtype=dtype, **kwargs, **AFFINE[affine]))
    ours.num_batches_tracked.fill_(start)
    bn = bnlab.nn.BatchNorm(c, momentum=momentum, dtype=dtype, **AFFINE[affine])
    bn.load_state_dict(ours.state_dict())
    for step in range(3):
        x = make_input(shape, layout, dtype, seed=step)
        grad_out = make_input(shape, layout, dtype, seed=100 + step, requires_grad=False)
        (out, dx, grads), (bn_out, bn_dx, bn_grads) = run(ours, x, grad_out), run(bn, x, grad_out)
        assert torch.equal(out, bn_out) and torch.equal(dx, bn_dx)
        assert out.stride() == bn_out.stride()
        assert all(torch.equal(a, b) for a, b in zip(grads, bn_grads))
        for name, buffer in bn.named_buffers():
            assert torch.equal(getattr(ours, name), buffer), name
    assert int(ours.num_batches_tracked) == start + 3


# ---------------------------------------------------------------------------------------------
# relaxed: the paper's equations in float64
# ---------------------------------------------------------------------------------------------


def renorm_reference(x, gamma, beta, running_mean, running_var, eps, r_max, d_max, dout):
    """Ioffe 2017, Algorithm 1 on x (N, C, *), r and d constants in backprop. NumPy float64.

    Returns (y, dx, dgamma, dbeta, r_unclipped, d_unclipped, batch_mean, unbiased_batch_var).
    """
    moved = np.moveaxis(x, 1, -1).shape
    rows, drows = reference._to_rows(x), reference._to_rows(dout)  # (m, C)
    m = rows.shape[0]
    mu_b, var_b = rows.mean(axis=0), rows.var(axis=0)
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(running_var + eps)
    r_raw, d_raw = sigma_b / sigma, (mu_b - running_mean) / sigma
    r, d = np.clip(r_raw, 1 / r_max, r_max), np.clip(d_raw, -d_max, d_max)
    xhat = (rows - mu_b) / sigma_b
    xr = xhat * r + d
    g = np.ones_like(mu_b) if gamma is None else gamma
    y = g * xr + (0.0 if beta is None else beta)
    dxhat = drows * g * r  # dL/dxhat; r, d constants
    dx = (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0)) / sigma_b
    dgamma, dbeta = (drows * xr).sum(axis=0), drows.sum(axis=0)
    out = [reference._from_rows(y, moved), reference._from_rows(dx, moved), dgamma, dbeta]
    return (*out, r_raw, d_raw, mu_b, var_b * m / (m - 1))


def set_running_stats(module, x, mode):
    """Running statistics placed against x's batch statistics so that r, d are clipped or not."""
    xs = to_numpy(x)
    mu, var = reference._channel_stats(xs)[:2]
    sigma_b = np.sqrt(var + module.eps)
    c = len(mu)
    if mode == "unclipped":  # |d| < 5 and 1/3 < r < 3 in every channel
        sigma = sigma_b * np.linspace(0.5, 2.0, c)
        mean = mu - sigma * np.linspace(-2.0, 2.0, c)
    else:  # channel 0 inside, channel 1 clipped above (r > 3, d > 5), channel 2 below
        sigma = sigma_b * np.array([1.5, 0.1, 10.0])[:c]
        mean = mu - sigma * np.array([1.0, 20.0, -20.0])[:c]
    with torch.no_grad():
        module.running_mean.copy_(torch.from_numpy(mean))
        module.running_var.copy_(torch.from_numpy(sigma**2 - module.eps))


@pytest.mark.parametrize("momentum", [0.01, 0.5, None])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("mode", ["clipped", "unclipped"])
@pytest.mark.parametrize("shape,layout", list(shape_layouts()), ids=str)
def test_relaxed_renorm_matches_reference(shape, layout, mode, affine, momentum):
    ours = randomize(
        RENORM[len(shape)](shape[1], momentum=momentum, dtype=torch.float64, **AFFINE[affine])
    )
    ours.num_batches_tracked.fill_(PAST_SCHEDULE)
    x = make_input(shape, layout, torch.float64, seed=0)
    set_running_stats(ours, x, mode)
    for step in range(2):  # the second step renormalizes against the updated running statistics
        x = make_input(shape, layout, torch.float64, seed=step)
        grad_out = make_input(shape, layout, torch.float64, seed=100 + step, requires_grad=False)
        rm, rv = to_numpy(ours.running_mean), to_numpy(ours.running_var)
        nbt = int(ours.num_batches_tracked)
        out, dx, grads = run(ours, x, grad_out)
        y, ref_dx, dgamma, dbeta, r_raw, d_raw, mu_b, var_b = renorm_reference(
            to_numpy(x),
            to_numpy(ours.weight),
            to_numpy(ours.bias),
            rm,
            rv,
            ours.eps,
            3.0,
            5.0,
            to_numpy(grad_out),
        )
        if step == 0:
            clipped = (r_raw > 3) | (r_raw < 1 / 3) | (np.abs(d_raw) > 5)
            assert clipped.any() == (mode == "clipped") and not clipped.all()
        assert_close(out, torch.from_numpy(y), torch.float64, FORWARD)
        assert_close(dx, torch.from_numpy(ref_dx), torch.float64, GRADIENT)
        ref_grads = [g for g, p in ((dgamma, ours.weight), (dbeta, ours.bias)) if p is not None]
        for grad, ref in zip(grads, ref_grads):
            assert_close(grad, torch.from_numpy(ref), torch.float64, GRADIENT)
        f = 1.0 / (nbt + 1) if momentum is None else momentum
        np.testing.assert_allclose(to_numpy(ours.running_mean), rm + f * (mu_b - rm), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(ours.running_var), rv + f * (var_b - rv), rtol=1e-12)
        assert int(ours.num_batches_tracked) == nbt + 1


def test_reference_gradient_is_the_gradient_with_r_and_d_frozen():
    """The test's own oracle: its dx is the numeric gradient of y(x) with r and d held fixed."""
    g = np.random.default_rng(0)
    x, dout = g.normal(size=(5, 3, 2)) * 2 + 1, g.normal(size=(5, 3, 2))
    gamma, beta = g.uniform(0.5, 1.5, 3), g.normal(size=3)
    rm, rv, eps = np.array([0.0, 10.0, -10.0]), np.array([0.5, 0.01, 100.0]), 1e-5
    _, dx, *_ = renorm_reference(x, gamma, beta, rm, rv, eps, 3.0, 5.0, dout)
    rows = reference._to_rows(x)
    sigma_b, sigma = np.sqrt(rows.var(0) + eps), np.sqrt(rv + eps)
    r = np.clip(sigma_b / sigma, 1 / 3, 3)
    d = np.clip((rows.mean(0) - rm) / sigma, -5, 5)
    assert (r != sigma_b / sigma).any() and (d != (rows.mean(0) - rm) / sigma).any()

    def frozen(x):
        xh = reference.spatial_batchnorm_forward(x, None, None, eps)[0]
        return gamma[:, None] * (xh * r[:, None] + d[:, None]) + beta[:, None]

    numeric = reference.numeric_gradient(frozen, x.copy(), dout)
    assert reference.rel_error(dx, numeric) < 1e-7


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step,r_lim,d_lim",
    [
        (0, 1.0, 0.0),
        (4999, 1.0, 0.0),
        (5000, 1.0, 0.0),
        (15000, 1 + 2 * 10 / 35, 5 * 10 / 20),
        (22500, 2.0, 4.375),
        (25000, 1 + 2 * 20 / 35, 5.0),
        (40000, 3.0, 5.0),
        (10**7, 3.0, 5.0),
    ],
)
def test_default_schedule(step, r_lim, d_lim):
    bn = BatchRenorm2d(3, dtype=torch.float64)
    bn.num_batches_tracked.fill_(step)
    limits = bn.clip_limits()
    assert [t.dtype for t in limits] == [torch.float64] * 2 and limits[0].dim() == 0
    expected = tuple(torch.tensor(v, dtype=torch.float64) for v in (r_lim, d_lim))
    torch.testing.assert_close(limits, expected, rtol=1e-14, atol=0)


def test_schedule_advances_once_per_finite_training_batch():
    bn = BatchRenorm1d(
        3, r_max=2.0, d_max=1.0, warmup_steps=2, r_max_steps=6, d_max_steps=2
    )  # d_max jumps to 1 at step 2
    expected = [(1, 0), (1, 0), (1, 1), (1.25, 1), (1.5, 1), (1.75, 1), (2, 1), (2, 1)]
    for r_lim, d_lim in expected:
        assert [float(t) for t in bn.clip_limits()] == [r_lim, d_lim]
        bn(torch.randn(8, 3))
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    bn(bad)
    bn.eval()
    bn(torch.randn(8, 3))
    assert int(bn.num_batches_tracked) == len(expected)  # neither a NaN batch nor eval counts


def test_state_dict_round_trip_resumes_the_schedule():
    kwargs = dict(momentum=0.3, warmup_steps=2, r_max_steps=7, d_max_steps=4)
    first = randomize(BatchRenorm2d(3, **kwargs))
    for seed in range(4):
        first(make_input((4, 3, 3, 3), "contiguous", torch.float32, seed))
    second = BatchRenorm2d(3, **kwargs)
    second.load_state_dict(first.state_dict())
    assert list(second.state_dict()) == list(bnlab.nn.BatchNorm2d(3).state_dict())
    for seed in range(4, 10):  # the limits keep growing, r and d move, on both identically
        x = make_input((4, 3, 3, 3), "contiguous", torch.float32, seed)
        grad_out = make_input((4, 3, 3, 3), "contiguous", torch.float32, 100 + seed, False)
        a, b = run(first, x, grad_out), run(second, x, grad_out)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert all(torch.equal(p, q) for p, q in zip(first.clip_limits(), second.clip_limits()))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_loads_a_torch_nn_checkpoint_and_back():
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2))
    ours = BatchRenorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    assert int(ours.num_batches_tracked) == 1
    torch.nn.BatchNorm2d(3).load_state_dict(ours.state_dict())


# ---------------------------------------------------------------------------------------------
# eval, precision, non-finite batches, arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,layout", list(shape_layouts()), ids=str)
def test_eval_is_batchnorm_eval(shape, layout):
    ours = randomize(BatchRenorm(shape[1], dtype=torch.float64, **RELAXED))
    for seed in range(3):
        ours(make_input(shape, layout, torch.float64, seed))
    ours.eval()
    bn = bnlab.nn.BatchNorm(shape[1], dtype=torch.float64).eval()
    bn.load_state_dict(ours.state_dict())
    x = make_input(shape, layout, torch.float64, seed=9)
    grad_out = make_input(shape, layout, torch.float64, seed=99, requires_grad=False)
    (out, dx, grads), (bn_out, bn_dx, bn_grads) = run(ours, x, grad_out), run(bn, x, grad_out)
    assert torch.equal(out, bn_out) and torch.equal(dx, bn_dx)
    assert all(torch.equal(a, b) for a, b in zip(grads, bn_grads))
    expected = reference.batchnorm_eval_forward(
        to_numpy(x),
        to_numpy(ours.weight),
        to_numpy(ours.bias),
        to_numpy(ours.running_mean),
        to_numpy(ours.running_var),
        ours.eps,
    )
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-12, rtol=1e-12)
    assert int(ours.num_batches_tracked) == 3


def test_bfloat16_under_autocast_is_close_to_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), BatchRenorm2d(4, **RELAXED))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(0.05)  # r and d clipped in some channels: renorm is live
    reference_model = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6)
    expected = reference_model(x)
    plain = bnlab.batch_norm(model[0](x), None, None, training=True)
    assert (expected - plain).abs().max() > 0.5  # r and d are far from 1 and 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=6e-2, rtol=6e-2)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    renorm, ref_renorm = model[1], reference_model[1]
    assert renorm.running_var.dtype == torch.float32
    torch.testing.assert_close(renorm.running_mean, ref_renorm.running_mean, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(renorm.running_var, ref_renorm.running_var, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bfloat16_input_computes_in_float32(param_dtype):
    ours = randomize(BatchRenorm2d(3, **RELAXED)).to(param_dtype)
    x32 = make_input((4, 3, 5, 5), "channels_last", torch.float32, seed=0)
    ref = randomize(BatchRenorm2d(3, **RELAXED)).to(param_dtype).float()
    expected = ref(x32.detach().bfloat16().float())
    out = ours(x32.detach().bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert_rounded_once(out, expected)


@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_batch_leaves_running_statistics(strict):
    bn = randomize(BatchRenorm2d(3, strict=strict, **RELAXED))
    bn(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 0] = float("inf")
    if strict:
        with pytest.raises(bnlab.NonFiniteStatisticsError, match=r"channels \[2\]"):
            bn(x)
    else:
        assert torch.isfinite(bn(x)[:, :2]).all()  # other channels are untouched by channel 2's inf
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r_max": 0.5}, "r_max must be a finite number >= 1"),
        ({"r_max": float("nan")}, "r_max"),
        ({"r_max": float("inf")}, "r_max"),
        ({"d_max": -1.0}, "d_max must be a finite number >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
        ({"warmup_steps": 100, "r_max_steps": 50}, r"r_max_steps .* >= warmup_steps=100, got 50"),
        ({"d_max_steps": 2.5}, "d_max_steps"),
        ({"track_running_stats": False}, "track_running_stats=True"),
        ({"momentum": 2.0}, "momentum"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kwargs)


def test_input_checks_and_repr():
    with pytest.raises(ValueError, match="expected 4D input"):
        BatchRenorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    with pytest.raises(TypeError, match="expects a floating-point input"):
        BatchRenorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rank >= 2"):
        BatchRenorm(3)(torch.randn(3))
    text = repr(BatchRenorm2d(3))
    assert "momentum=0.01" in text and "r_max=3.0, d_max=5.0, warmup_steps=5000" in text
    assert isinstance(BatchRenorm2d(3), bnlab.nn.BatchNorm)


def test_public_names():
    assert (
        bnlab.nn.BatchRenorm,
        bnlab.nn.BatchRenorm1d,
        bnlab.nn.BatchRenorm2d,
        bnlab.nn.BatchRenorm3d,
    ) == (BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d)
    names = {"BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"}
    assert names <= set(bnlab.nn.__all__)
