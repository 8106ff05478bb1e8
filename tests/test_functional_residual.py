"""bnlab.functional.batch_norm_add_act: act(batch_norm(x) + residual), the end of a residual unit,
fused and in the in-place activated mode, on every backend, against torch.nn.functional and the
float64 truth."""

import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from bnlab.checks import check_residual_activation
from test_functional_act import params, rand
from tolerances import ROUNDOFF, assert_step_within, assert_within, batch_norm_bounds

BACKENDS = [
    name
    for name in bnlab.kernels.available_backends()
    if bnlab.kernels.get_backend(name).supports("batch_norm_act", torch.empty(2, 3))
]
TORCH_ACT = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: TF.relu(z),
    "leaky_relu": lambda z, p: TF.leaky_relu(z, p),
}
CASES = [
    ("identity", None, False),
    ("relu", None, False),
    ("leaky_relu", 0.2, False),
    ("identity", None, True),
    ("leaky_relu", 0.01, True),
]
SHAPES = [
    ((16, 5), None),
    ((4, 3, 5, 6), None),
    ((4, 3, 5, 6), torch.channels_last),
    ((2, 3, 3, 4, 5), torch.channels_last_3d),
]


def torch_unit(x, r, w, b, rm, rv, training, activation, param, inplace, eps=1e-5):
    """The residual unit in torch.nn.functional ops (gamma = |w| + eps in place)."""
    weight = w.abs() + eps if inplace else w
    z = TF.batch_norm(x, rm, rv, weight, b, training, 0.1, eps)
    return TORCH_ACT[activation](z + r, check_residual_activation(activation, param, False)[1])


def run_step(fn, x, r, dy, w, b, rm, rv):
    """Forward + backward on fresh leaves: (results, output, the input as passed)."""
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    stats = rm.clone(), rv.clone()
    xin = leaves[0] * 1.0  # a non-leaf: the in-place mode writes over it
    y = fn(xin, *leaves[1:], *stats)
    out = y.detach().clone()
    y.backward(dy)
    names = ("dx", "dresidual", "dweight", "dbias")
    results = dict(out=out, **{n: t.grad for n, t in zip(names, leaves)})
    return dict(results, running_mean=stats[0], running_var=stats[1]), y, xin


def ours(backend, training, activation, param, inplace):
    def fn(x, r, w, b, rm, rv):
        return F.batch_norm_add_act(
            x, r, rm, rv, w, b, training, 0.1, 1e-5, activation, param,
            inplace=inplace, backend=backend,
        )  # fmt: skip

    return fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param,inplace", CASES)
@pytest.mark.parametrize("shape,fmt", SHAPES, ids=str)
@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_float64_matches_torch(backend, shape, fmt, activation, param, inplace, training):
    x, r, dy = (rand(shape, seed=s, fmt=fmt) for s in (0, 1, 2))
    w, b, rm, rv = params(shape[1], torch.float64)
    got, y, xin = run_step(
        ours(backend, training, activation, param, inplace), x, r, dy, w, b, rm, rv
    )
    assert (y is xin) == inplace and y.stride() == x.stride()

    def theirs(*args):
        return torch_unit(*args, training, activation, param, inplace)

    want, _, _ = run_step(theirs, x, r, dy, w, b, rm, rv)
    for key, expected in want.items():
        torch.testing.assert_close(got[key], expected, rtol=1e-10, atol=1e-10, msg=key)


# large enough for bnlab's CPU kernels (NCS from 1M values, channels_last from 1M with an
# activation) and small ones that run as batch norm, then += and the activation
FLOAT32_SHAPES = [
    ((4, 16, 128, 128), None),
    ((4, 64, 64, 64), torch.channels_last),
    ((4, 8, 9, 9), None),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,param,inplace", CASES)
@pytest.mark.parametrize("shape,fmt", FLOAT32_SHAPES, ids=str)
def test_float32_within_derived_bounds(shape, fmt, activation, param, inplace, training):
    """float32 results within the bounds derived for batch norm of dz = dy act'(y) (act' exact
    or one rounding), plus one rounding of the addition in the output."""
    dtype = torch.float32
    x, r, dy = (rand(shape, dtype, s, fmt) for s in (0, 1, 2))
    w, b, rm, rv = params(shape[1], dtype)
    got, _, _ = run_step(ours(None, training, activation, param, inplace), x, r, dy, w, b, rm, rv)
    p = check_residual_activation(activation, param, inplace)[1]
    # the truth's dz: act'(z + r) from the float64 output, applied to the float32 dy
    y64 = torch_unit(*(t.double() for t in (x, r, w, b, rm, rv)), training, activation, p, inplace)
    dz = dy.double() * torch.where(y64 > 0, 1.0, {"identity": 1.0, "relu": 0.0}.get(activation, p))
    truth, bounds = batch_norm_bounds(
        x, dz, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5, dtype=dtype,
        inplace=inplace,
    )  # fmt: skip
    u = ROUNDOFF[dtype]
    truth["out"], bounds["out"] = y64, bounds["out"] + u * (truth["z"].abs() + r.double().abs())
    if inplace:  # the backward recovers z from y and r: their roundings enter dx and dweight
        slack = 8 * u * (y64.abs() + r.double().abs()).max() / w.double().abs().min()
        for key in ("dx", "dweight", "dbias"):
            bounds[key] = bounds[key] + slack * truth[key].abs().max() + slack * dz.abs().max()
    truth["dresidual"], bounds["dresidual"] = dz, torch.zeros_like(dz)
    if not training:
        assert torch.equal(got.pop("running_mean"), rm) and torch.equal(got.pop("running_var"), rv)
    assert_step_within(got, truth, bounds, f"{shape} ")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", [((6, 3), None), ((3, 2, 3, 4), torch.channels_last)])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "gpu"])
def test_gradcheck(backend, shape, fmt, training, inplace):
    x, r = rand(shape, fmt=fmt).requires_grad_(), rand(shape, seed=1, fmt=fmt).requires_grad_()
    w, b, rm, rv = params(shape[1], torch.float64)
    w, b = w.requires_grad_(), b.requires_grad_()
    activation, param = ("leaky_relu", 0.3) if inplace else ("relu", None)

    def f(x, r, w, b):
        return F.batch_norm_add_act(
            x * 1.0, r, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, activation, param,
            inplace=inplace, backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, r, w, b))


@pytest.mark.parametrize(
    "residual,kwargs,error,match",
    [
        (torch.zeros(8, 3, 5), {}, ValueError, r"residual must have the input's shape"),
        (torch.zeros(8, 3, 1), {}, ValueError, "no broadcasting"),
        (torch.zeros(8, 3, 4, dtype=torch.float32), {}, ValueError, "float32"),
        ([0.0], {}, TypeError, "residual must be a Tensor"),
        (None, {"activation": "silu"}, ValueError, r"one of \('identity', 'relu', 'leaky_relu'\)"),
        (None, {"activation": "leaky_relu", "activation_param": -0.1}, ValueError, "slope > 0"),
        (None, {"activation": "relu", "inplace": True}, ValueError, "not invertible"),
    ],
)
def test_bad_arguments_raise_and_leave_everything(residual, kwargs, error, match):
    x = rand((8, 3, 4))
    residual = torch.zeros_like(x) if residual is None else residual
    before = x.clone()
    rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    with pytest.raises(error, match=match):
        F.batch_norm_add_act(x, residual, rm, rv, training=True, **kwargs)
    assert torch.equal(x, before) and not rm.any() and torch.equal(rv, torch.ones(3, dtype=x.dtype))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(8, 3, 4), (4, 8, 128, 128)], ids=str)
def test_non_finite_batch_leaves_running_statistics(shape, inplace):
    x, r = rand(shape, torch.float32), rand(shape, torch.float32, seed=1)
    x[2, 1, 3] = float("nan")
    c = shape[1]
    rm, rv, count = torch.zeros(c), torch.ones(c), torch.tensor(5)
    F.batch_norm_add_act(
        x, r, rm, rv, training=True, num_batches_tracked=count, activation="leaky_relu",
        inplace=inplace,
    )  # fmt: skip
    assert not rm.any() and torch.equal(rv, torch.ones(c)) and int(count) == 5
    with pytest.raises(bnlab.NonFiniteStatisticsError, match=r"channels \[1\]"):
        F.batch_norm_add_act(
            rand(shape, torch.float32).index_fill_(1, torch.tensor([1]), float("inf")),
            r, rm, rv, training=True, strict=True,
        )  # fmt: skip


def test_automatic_selection_fuses_where_the_cpu_kernels_run():
    """Large inputs go to kernels that add the residual in their pass; small ones run ATen's
    batch norm, then += and the activation in place, exactly as a block's own code; the in-place
    mode takes the fusing kernels whatever their size."""
    kernels = bnlab.kernels
    if "cpu" not in kernels.available_backends():
        pytest.skip("Numba not installed")
    big, small = torch.empty(4, 16, 128, 128), torch.empty(4, 8, 9, 9)
    pick = kernels.select_residual_backend
    assert kernels.adds_residual(pick(big, True, None, "relu", False))
    assert not kernels.adds_residual(pick(small, True, None, "relu", False))
    assert kernels.adds_residual(pick(small, True, None, "leaky_relu", True))
    assert not kernels.adds_residual(pick(small, False, "native", "leaky_relu", True))
    x, r = rand(small.shape, torch.float32), rand(small.shape, torch.float32, seed=1)
    rm, rv = torch.zeros(8), torch.ones(8)
    got = F.batch_norm_add_act(x, r, rm.clone(), rv.clone(), training=True)
    want = TF.batch_norm(x, rm.clone(), rv.clone(), None, None, True)
    assert torch.equal(got, want.add_(r).relu_())


def test_in_place_keeps_only_the_output_and_the_residual():
    x, r = rand((4, 16, 128, 128), torch.float32), rand((4, 16, 128, 128), torch.float32, seed=1)
    xin = x.clone().requires_grad_() * 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = F.batch_norm_add_act(
            xin, r, None, None, training=True, activation="leaky_relu", inplace=True
        )
    big = [t for t in saved if t.numel() == x.numel()]
    assert y is xin and len(big) == 2
    assert any(t.data_ptr() == y.data_ptr() for t in big)
    assert any(t.data_ptr() == r.data_ptr() for t in big)
    truth = TF.leaky_relu(TF.batch_norm(x.double(), None, None, training=True) + r.double())
    assert_within(y, truth, torch.full(x.shape, 64 * ROUNDOFF[torch.float32]), "y")
