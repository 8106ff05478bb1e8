"""bnlab.functional: gradients, the custom-op contract, compile/export, half types and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from bnlab import reference
from tolerances import assert_step_within, batch_norm_bounds, layer_norm_bounds

F64 = torch.float64


def rand(*shape, dtype=F64, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        )
    return x


GRAD_SHAPES = [
    ((5, 3), False),
    ((4, 3, 5), False),
    ((3, 2, 3, 4), False),
    ((3, 2, 3, 4), True),
    ((2, 2, 2, 3, 2), True),
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,channels_last", GRAD_SHAPES)
def test_batch_norm_gradcheck_and_gradgradcheck(shape, channels_last, training, affine):
    c = shape[1]
    x = rand(*shape, channels_last=channels_last).requires_grad_()
    w = (rand(c, seed=1) + 2).requires_grad_() if affine else None
    b = rand(c, seed=2).requires_grad_() if affine else None
    rm, rv = rand(c, seed=3), rand(c, seed=4).abs() + 0.5
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def f(*args):
        xx, ww, bb = (args + (None, None))[:3] if affine else (args[0], None, None)
        return F.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5), (2, 3, 2, 3)])
@pytest.mark.parametrize("k", [1, 2])
def test_layer_norm_gradcheck_and_gradgradcheck(shape, k):
    x = rand(*shape).requires_grad_()
    w = (rand(*shape[-k:], seed=1) + 2).requires_grad_()
    b = rand(*shape[-k:], seed=2).requires_grad_()
    f = lambda x, w, b: F.layer_norm(x, shape[-k:], w, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_second_derivative_matches_torch():
    """A gradient penalty: d/dx of |d(sum y^2)/dx|^2, against torch's native batch norm."""
    x = rand(6, 3, 4, 4).requires_grad_()
    w = (rand(3, seed=1) + 2).requires_grad_()

    def penalty(fn):
        y = fn(x, None, None, w, None, True)
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), (x, w))

    for ours, theirs in zip(penalty(F.batch_norm), penalty(TF.batch_norm)):
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(dtype, training, channels_last):
    """The custom ops' schema, fake kernels, autograd registration and strides agree."""
    x = rand(4, 3, 5, 5, dtype=dtype, channels_last=channels_last).requires_grad_()
    stat_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = rand(3, dtype=stat_dtype).requires_grad_()
    rm, rv = torch.zeros(3, dtype=stat_dtype), torch.ones(3, dtype=stat_dtype)
    mask = torch.rand(4, 5, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    for m in (None, mask):
        torch.library.opcheck(
            torch.ops.bnlab.batch_norm.default,
            (x, w, None, rm, rv, m, training, 1e-5, "composite", None),
        )
    torch.library.opcheck(
        torch.ops.bnlab.layer_norm.default, (x, [5, 5], None, None, 1e-5, "composite")
    )
    dy = torch.ones_like(x)
    torch.library.opcheck(
        torch.ops.bnlab.batch_norm_backward.default,
        (
            dy,
            x.detach(),
            w.detach(),
            rm,
            rv,
            mask,
            training,
            1e-5,
            [True, True, False],
            "composite",
            None,
        ),
    )


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = bnlab.nn.BatchNorm2d(4, momentum=None)
        self.ln = bnlab.nn.LayerNorm(4)

    def forward(self, x):
        return self.ln(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    eager, compiled = Net(), Net()
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled, fullgraph=True, backend=backend)
    for step in range(2):
        x = rand(8, 3, 7, 7, dtype=torch.float32, seed=step)
        if step == 1:
            x[0, 0, 0, 0] = float(
                "nan"
            )  # the poisoned-batch guard must compile without a graph break
        expected, actual = eager(x), run(x)
        torch.testing.assert_close(actual, expected, equal_nan=True)
        expected.nan_to_num().sum().backward()
        actual.nan_to_num().sum().backward()
    for (name, a), (_, b) in zip(compiled.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert int(compiled.bn.num_batches_tracked) == 1  # the NaN batch was not counted
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("training", [False, True])
def test_export_sees_one_op(training):
    model = Net().train(training)
    x = rand(8, 3, 7, 7, dtype=torch.float32)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("bnlab.batch_norm.default") == 1
    assert targets.count("bnlab.layer_norm.default") == 1
    assert not any("native_batch_norm" in t or "native_layer_norm" in t for t in targets)
    if not training:
        torch.testing.assert_close(exported.module()(x), model(x))


def test_far_from_zero_statistics_stay_accurate():
    """float32 data at 1e4 + N(0, 1): E[x^2] - E[x]^2 would lose the variance entirely."""
    x = (1e4 + rand(64, 3, 16, 16, dtype=F64)).float()
    rm, rv = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact = x.double().var(dim=(0, 2, 3))
    assert ((rv.double() - exact).abs() / exact).max() < 1e-3


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", ["half", "float32"])
def test_half_inputs_compute_in_float32(half, param_dtype):
    """Half inputs within the float32 bound plus one rounding to their type, nothing more."""
    p_dtype = half if param_dtype == "half" else torch.float32
    x = (rand(8, 3, 4, 4) * 3 + 5).to(half).requires_grad_()
    w, b = (
        (rand(3, seed=1) + 2).to(p_dtype).requires_grad_(),
        rand(3, seed=2).to(p_dtype).requires_grad_(),
    )
    rm, rv = torch.zeros(3, dtype=p_dtype), torch.ones(3, dtype=p_dtype)
    dy = torch.ones_like(x)
    truth, bounds = batch_norm_bounds(
        x, dy, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5, dtype=half
    )
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    assert y.dtype == half and rm.dtype == p_dtype
    y.backward(dy)
    assert w.grad.dtype == p_dtype and x.grad.dtype == half
    assert_step_within(
        dict(out=y, dx=x.grad, dweight=w.grad, dbias=b.grad, running_mean=rm, running_var=rv),
        truth,
        bounds,
    )


@pytest.mark.parametrize(
    "shape,k",
    [((2, 3), 1), ((60, 100), 1), ((8, 16, 5, 5), 2), ((4, 3, 2, 5, 5), 3), ((1, 4, 7, 7), 1)],
)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_layer_norm_matches_torch_and_reference(shape, k, affine, dtype):
    """bnlab and torch.nn.functional each within the derived bound of the float64 truth."""
    x = rand(*shape, dtype=dtype).requires_grad_()
    norm = shape[-k:]
    w = (rand(*norm, seed=1, dtype=dtype) + 2).requires_grad_() if affine else None
    b = rand(*norm, seed=2, dtype=dtype).requires_grad_() if affine else None
    dy = rand(*shape, seed=3, dtype=dtype)
    params = [t for t in (x, w, b) if t is not None]
    truth, bounds = layer_norm_bounds(x, dy, w, b, k, eps=1e-5, dtype=dtype)
    for name, fn in (("bnlab", F.layer_norm), ("torch", TF.layer_norm)):
        out = fn(x, norm, w, b)
        grads = dict(zip(["dx", "dweight", "dbias"], torch.autograd.grad(out, params, dy)))
        assert_step_within(dict(out=out, **grads), truth, bounds, f"{name} ")
    if dtype == F64:
        ours = F.layer_norm(x, norm, w, b)
        as_np = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
        ref, cache = reference.layernorm_forward(as_np(x), as_np(w), as_np(b), 1e-5, k)
        np.testing.assert_allclose(ours.detach().numpy(), ref, atol=1e-12)
        ref_dx, _, _ = reference.layernorm_backward(dy.numpy(), cache)
        np.testing.assert_allclose(torch.autograd.grad(ours, x, dy)[0].numpy(), ref_dx, atol=1e-10)


def test_cumulative_average_and_momentum_one():
    rm, rv, nbt = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), torch.tensor(0)
    batches = [rand(10, 2, seed=s) for s in range(3)]
    for x in batches:
        F.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    torch.testing.assert_close(rm, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(rv, torch.stack([x.var(0) for x in batches]).mean(0))
    assert int(nbt) == 3
    F.batch_norm(batches[0], rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv, batches[0].var(0))


BAD = [
    (lambda: F.batch_norm(torch.randn(3), None, None, training=True), ValueError, r"rank >= 2"),
    (
        lambda: F.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True),
        TypeError,
        "floating-point input.*torch.int64",
    ),
    (
        lambda: F.batch_norm(torch.ones(4, 3, dtype=torch.bool), None, None, training=True),
        TypeError,
        "torch.bool",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True),
        ValueError,
        r"weight has shape \(4,\), expected \(3,\)",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), None, None, None, torch.ones(2), training=True),
        ValueError,
        r"bias has shape \(2,\)",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(5), torch.ones(3), training=True),
        ValueError,
        r"running_mean has shape \(5,\)",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3, 1), training=True),
        ValueError,
        r"running_var has shape \(3, 1\)",
    ),
    (
        lambda: F.batch_norm(
            torch.randn(4, 3), torch.zeros(3, dtype=F64), torch.ones(3), training=True
        ),
        TypeError,
        "running_mean has dtype torch.float64, expected torch.float32",
    ),
    (
        lambda: F.batch_norm(
            torch.randn(4, 3), None, None, torch.ones(3, device="meta"), training=True
        ),
        ValueError,
        "weight is on meta, expected the input's device cpu",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
        ValueError,
        "eps must be > 0",
    ),
    (
        lambda: F.batch_norm(
            torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=2.0
        ),
        ValueError,
        r"momentum must be in \[0, 1\]",
    ),
    (
        lambda: F.batch_norm(
            torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None
        ),
        ValueError,
        "needs num_batches_tracked",
    ),
    (
        lambda: F.batch_norm(torch.randn(1, 3), None, None, training=True),
        ValueError,
        "Expected more than 1 value per channel when training",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False),
        ValueError,
        "eval mode .* needs running_mean",
    ),
    (
        lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True),
        ValueError,
        "given together",
    ),
    (
        lambda: F.batch_norm([[1.0]], None, None),
        TypeError,
        "expects a torch.Tensor input, got list",
    ),
    (
        lambda: F.layer_norm(torch.randn(4, 3), (4,)),
        ValueError,
        r"normalized_shape=\[4\].*shape \(4, 3\)",
    ),
    (
        lambda: F.layer_norm(torch.randn(4, 3), (3,), torch.ones(4)),
        ValueError,
        r"weight has shape \(4,\)",
    ),
    (lambda: F.layer_norm(torch.ones(4, 3, dtype=torch.int32), (3,)), TypeError, "torch.int32"),
    (lambda: F.layer_norm(torch.randn(4, 3), (3,), eps=-1.0), ValueError, "eps must be > 0"),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_input_leaves_running_statistics():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    with pytest.raises(ValueError):
        F.batch_norm(
            torch.randn(4, 3), rm, rv, torch.ones(4), training=True, num_batches_tracked=nbt
        )
    assert rm.eq(0).all() and rv.eq(1).all() and int(nbt) == 0


def masked_case(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 3
    mask = torch.rand((shape[0], *shape[2:]), generator=g) > 0.4
    return x, mask


def valid_rows(t, mask):
    """(M, C): the values of t (N, C, *) at mask's True positions."""
    return t.movedim(1, -1)[mask]


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 7), (3, 2, 4, 5)])
def test_masked_statistics_are_those_of_the_valid_values(shape):
    x, mask = masked_case(shape)
    w, b = rand(shape[1], seed=1) + 2, rand(shape[1], seed=2)
    rm, rv = torch.zeros(shape[1], dtype=F64), torch.ones(shape[1], dtype=F64)
    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=1.0, mask=mask)
    valid = valid_rows(x, mask).numpy()
    expected, _ = reference.batchnorm_forward(valid, w.numpy(), b.numpy())
    np.testing.assert_allclose(valid_rows(y, mask).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(rm.numpy(), valid.mean(0), atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), valid.var(0, ddof=1), atol=1e-12)
    # padding positions are normalized with the same statistics
    scale = w / torch.sqrt(torch.from_numpy(valid.var(0)) + 1e-5)
    pad = valid_rows(x, ~mask)
    torch.testing.assert_close(
        valid_rows(y, ~mask), (pad - torch.from_numpy(valid.mean(0))) * scale + b
    )


@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 5), (3, 2, 3, 2)])
def test_masked_gradients(shape):
    x, mask = masked_case(shape)
    x.requires_grad_()
    w, b = (rand(shape[1], seed=1) + 2).requires_grad_(), rand(shape[1], seed=2).requires_grad_()
    f = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # with the loss on valid positions only, dx there is plain BN's on the valid values
    dy = rand(*shape, seed=3) * mask.unsqueeze(1)
    (dx,) = torch.autograd.grad(f(x, w, b), x, dy)
    _, cache = reference.batchnorm_forward(
        valid_rows(x, mask).detach().numpy(), w.detach().numpy(), b.detach().numpy()
    )
    ref_dx, _, _ = reference.batchnorm_backward(valid_rows(dy, mask).numpy(), cache)
    np.testing.assert_allclose(valid_rows(dx, mask).numpy(), ref_dx, atol=1e-10)
    assert valid_rows(dx, ~mask).abs().max() == 0


def test_all_true_mask_is_plain_batch_norm():
    x, _ = masked_case((4, 3, 5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    torch.testing.assert_close(
        F.batch_norm(x, None, None, training=True, mask=mask),
        F.batch_norm(x, None, None, training=True),
        atol=1e-12,
        rtol=0,
    )


def test_masked_module_and_bad_masks():
    bn = bnlab.nn.BatchNorm1d(3, dtype=F64)
    x, mask = masked_case((4, 3, 6))
    bn(x, mask=mask)
    assert int(bn.num_batches_tracked) == 1
    with pytest.raises(TypeError, match=r"mask must be a bool tensor .* got torch.float32"):
        bn(x, mask=mask.float())
    with pytest.raises(ValueError, match=r"mask has shape \(4, 5\), expected \(4, 6\)"):
        bn(x, mask=mask[:, :5])
    one = torch.zeros(4, 6, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 valid value per channel"):
        bn(x, mask=one)
    assert int(bn.num_batches_tracked) == 1
