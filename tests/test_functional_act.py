"""bnlab.functional.batch_norm_act: fused batch norm + activation and the in-place activated mode,
on every backend, against torch.nn.functional and the float64 reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from bnlab import reference
from tolerances import assert_step_within, batch_norm_bounds

BACKENDS = [
    name
    for name in bnlab.kernels.available_backends()  # those with the fused op
    if bnlab.kernels.get_backend(name).supports("batch_norm_act", torch.empty(2, 3))
]
TORCH_ACT = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: TF.relu(z),
    "leaky_relu": lambda z, p: TF.leaky_relu(z, p),
    "elu": lambda z, p: TF.elu(z, p),
}
CASES = [
    ("identity", None, False),
    ("relu", None, False),
    ("leaky_relu", 0.2, False),
    ("elu", 0.8, False),
    ("identity", None, True),
    ("leaky_relu", 0.01, True),
    ("elu", 1.0, True),
]
SHAPES = [
    ((16, 5), None),
    ((4, 3, 7), None),
    ((4, 3, 5, 6), None),
    ((4, 3, 5, 6), torch.channels_last),
    ((2, 3, 3, 4, 5), torch.channels_last_3d),
]


def rand(shape, dtype=torch.float64, seed=0, fmt=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def params(c, dtype, seed=0):
    """weight with both signs (the in-place mode uses |weight| + eps), bias, running statistics."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1.0]).repeat(
        c
    )[:c]
    b = torch.randn(c, generator=g, dtype=torch.float64)
    rm, rv = (
        torch.randn(c, generator=g, dtype=torch.float64),
        torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
    )
    return [t.to(dtype) for t in (w, b, rm, rv)]


def torch_version(x, w, b, rm, rv, training, activation, param, inplace, eps=1e-5):
    """What batch_norm_act computes, in torch.nn.functional ops (gamma = |w| + eps in place)."""
    weight = w.abs() + eps if inplace else w
    z = TF.batch_norm(x, rm, rv, weight, b, training, 0.1, eps)
    return TORCH_ACT[activation](z, F.check_activation(activation, param, inplace)[1])


def run_step(fn, x, dy, w, b, rm, rv):
    """Forward + backward of fn(x, w, b, rm, rv) on fresh leaves: (results dict, output)."""
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    stats = rm.clone(), rv.clone()
    xin = leaves[0] * 1.0  # a non-leaf: the in-place mode overwrites it
    y = fn(xin, *leaves[1:], *stats)
    out = y.detach().clone()
    y.backward(dy)
    results = dict(
        out=out,
        dx=leaves[0].grad,
        dweight=leaves[1].grad,
        dbias=leaves[2].grad,
        running_mean=stats[0],
        running_var=stats[1],
    )
    return results, y, xin


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation,param,inplace", CASES)
@pytest.mark.parametrize("shape,fmt", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch(backend, shape, fmt, activation, param, inplace, dtype, training):
    """bnlab and torch.nn.functional each within the derived bound of the float64 truth."""
    x, dy = rand(shape, dtype, 0, fmt), rand(shape, dtype, 1, fmt)
    w, b, rm, rv = params(shape[1], dtype)
    p = F.check_activation(activation, param, inplace)[1]
    ours, y, xin = run_step(
        lambda x, w, b, rm, rv: F.batch_norm_act(
            x,
            rm,
            rv,
            w,
            b,
            training,
            0.1,
            1e-5,
            activation,
            param,
            inplace=inplace,
            backend=backend,
        ),
        x,
        dy,
        w,
        b,
        rm,
        rv,
    )
    assert (y is xin) == inplace
    assert y.stride() == x.stride()
    theirs, _, _ = run_step(
        lambda x, w, b, rm, rv: torch_version(
            x, w, b, rm, rv, training, activation, param, inplace
        ),
        x,
        dy,
        w,
        b,
        rm,
        rv,
    )
    truth, bounds = batch_norm_bounds(
        x,
        dy,
        w,
        b,
        rm,
        rv,
        training=training,
        momentum=0.1,
        eps=1e-5,
        dtype=dtype,
        activation=activation,
        param=p,
        inplace=inplace,
    )
    if not training:
        for results in (ours, theirs):
            assert torch.equal(results.pop("running_mean"), rm)
            assert torch.equal(results.pop("running_var"), rv)
    assert_step_within(ours, truth, bounds, "bnlab ")
    assert_step_within(theirs, truth, bounds, "torch ")


def gradcheck_cases():
    """backend x layout. Triton's interpreter spends ~8 s per channels_last gradcheck; its backward
    on that layout is held to the composite backend's (gradchecked here) at 1e-12 in the contract
    grid (tests/kernels/test_contract.py), so it is gradchecked on (N, C) only."""
    for backend in BACKENDS:
        yield pytest.param(backend, (6, 3), None, id=f"{backend}-(6, 3)")
        if backend != "gpu":
            yield pytest.param(
                backend,
                (3, 2, 3, 4),
                torch.channels_last,
                id=f"{backend}-(3, 2, 3, 4)-channels_last",
            )


@pytest.mark.parametrize("activation,param,inplace", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,shape,fmt", list(gradcheck_cases()))
def test_gradcheck(backend, shape, fmt, training, activation, param, inplace):
    x = rand(shape, fmt=fmt).requires_grad_()
    w, b, rm, rv = params(shape[1], torch.float64)
    w, b = w.requires_grad_(), b.requires_grad_()

    def f(x, w, b):
        return F.batch_norm_act(
            x * 1.0,
            rm.clone(),
            rv.clone(),
            w,
            b,
            training,
            0.1,
            1e-5,
            activation,
            param,
            inplace=inplace,
            backend=backend,
        )

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("activation,param", [("relu", None), ("leaky_relu", 0.1), ("elu", 1.0)])
def test_matches_float64_reference(activation, param):
    x = rand((6, 4, 3, 5))
    w, b, _, _ = params(4, torch.float64)
    y = F.batch_norm_act(x, None, None, w, b, True, activation=activation, activation_param=param)
    z, _ = reference.spatial_batchnorm_forward(x.numpy(), w.numpy(), b.numpy(), 1e-5)
    p = F.check_activation(activation, param, False)[1]
    expected = {
        "relu": np.maximum(z, 0),
        "leaky_relu": np.where(z > 0, z, p * z),
        "elu": np.where(z > 0, z, p * np.expm1(np.minimum(z, 0))),
    }[activation]
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_keeps_only_the_output(backend):
    """Saved for backward: the output (which is the input's buffer) and per-channel vectors only;
    the fused op without in-place keeps x and no output; without in-place the native backend runs
    ATen's batch norm then the activation, which keep x and one more tensor of its size."""
    x = rand((8, 4, 6, 6), torch.float32).requires_grad_()
    w, b, rm, rv = (
        t.requires_grad_() if i < 2 else t for i, t in enumerate(params(4, torch.float32))
    )
    for inplace in (True, False):
        big = []

        def pack(t):
            if t.numel() == x.numel():
                big.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            xin = x * 1.0
            storage = xin.untyped_storage().data_ptr()
            y = F.batch_norm_act(
                xin, rm, rv, w, b, True, activation="leaky_relu", inplace=inplace, backend=backend
            )
        unfused = backend == "native" and not inplace
        assert big[0] == storage and len(big) == (2 if unfused else 1)
        assert (y.untyped_storage().data_ptr() == storage) == inplace


def test_inplace_over_a_tensor_its_producer_needs_is_caught_by_autograd():
    x = rand((8, 3)).requires_grad_()
    h = torch.sigmoid(x)  # sigmoid's backward needs its output h
    y = F.batch_norm_act(h, None, None, training=True, activation="leaky_relu", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="gelu"), "unknown activation 'gelu'"),
        (dict(activation="relu", inplace=True), "'relu' is not invertible"),
        (dict(activation="leaky_relu", activation_param=0.0, inplace=True), "must be > 0, got 0.0"),
        (dict(activation="elu", activation_param=-1.0), "alpha >= 0"),
    ],
)
def test_bad_activation_is_an_error_that_leaves_the_input(kwargs, match):
    x = rand((8, 3))
    before = x.clone()
    rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    with pytest.raises(ValueError, match=match):
        F.batch_norm_act(x, rm, rv, training=True, **kwargs)
    assert torch.equal(x, before) and not rm.any() and torch.equal(rv, torch.ones(3, dtype=x.dtype))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_batch_leaves_running_statistics(backend, inplace):
    x = rand((8, 3, 4))
    x[2, 1, 3] = float("nan")
    rm, rv, count = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), torch.tensor(5)
    F.batch_norm_act(
        x,
        rm,
        rv,
        training=True,
        num_batches_tracked=count,
        activation="leaky_relu",
        inplace=inplace,
        backend=backend,
    )
    assert not rm.any() and torch.equal(rv, torch.ones(3, dtype=x.dtype)) and int(count) == 5
    with pytest.raises(bnlab.NonFiniteStatisticsError, match=r"channels \[1\]"):
        F.batch_norm_act(
            rand((8, 3, 4)).index_fill_(1, torch.tensor([1]), float("inf")),
            rm,
            rv,
            training=True,
            strict=True,
            backend=backend,
        )
