"""bnlab.nn batch-norm modules against torch.nn and the float64 reference, over the acceptance
grid."""

import copy
import itertools
import pickle

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference
from tolerances import check_module_step, run, to_numpy

SHAPES = [(2, 3), (60, 100), (8, 16, 5, 5), (4, 3, 2, 5, 5), (1, 4, 7, 7)]
LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}
TORCH_CLASS = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
BNLAB_CLASS = {
    2: bnlab.nn.BatchNorm1d,
    3: bnlab.nn.BatchNorm1d,
    4: bnlab.nn.BatchNorm2d,
    5: bnlab.nn.BatchNorm3d,
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
BACKENDS = bnlab.kernels.available_backends()  # every backend runs the whole grid


def backend_cases(dtypes):
    """(backend, dtype) pairs the backend can run: a named backend never falls back."""
    probe = torch.empty(2, 3)
    for backend in BACKENDS:
        for dtype in dtypes:
            runs = bnlab.kernels.get_backend(backend).supports("batch_norm", probe.to(dtype))
            if runs:
                yield backend, dtype


def shape_layouts():
    for shape in SHAPES:
        yield shape, "contiguous"
        if len(shape) in LAYOUTS:
            yield shape, "channels_last"


def make_pair(shape, dtype, affine, track, momentum, seed=0, backend=None):
    """A torch.nn module and a bnlab module in the same, non-trivial state."""
    c = shape[1]
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    ours = BNLAB_CLASS[len(shape)](c, **kwargs, backend=backend)
    theirs = TORCH_CLASS[len(shape)](c, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if affine:
            theirs.weight.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.bias.copy_(torch.randn(c, generator=g))
        if track:
            theirs.running_mean.copy_(torch.randn(c, generator=g))
            theirs.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            theirs.num_batches_tracked.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_input(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=LAYOUTS[len(shape)])
    return x.requires_grad_()


# torch.nn's own bfloat16 CPU batch norm loses accuracy where a channel's spread is small against
# its mean (seen on torch 2.13: a (2, 3) batch off by 0.2 against float64). bnlab computes half
# types in float32, so for bfloat16 the torch.nn side runs in float32 on the same values.
TORCH_COMPUTE_DTYPE = {torch.bfloat16: torch.float32}


def module_grid():
    """shape x layout x affine x track x momentum x mode x backend x dtype. The momentum is applied
    outside the kernels (bnlab.functional), so Triton, slow in its CPU interpreter, runs one."""
    for (shape, layout), affine, track, momentum, training, (backend, dtype) in itertools.product(
        shape_layouts(),
        [True, False],
        [True, False],
        [0.1, None, 1.0],
        [True, False],
        backend_cases(DTYPES),
    ):
        if backend == "gpu" and momentum != 0.1:
            continue
        yield pytest.param(
            shape,
            layout,
            affine,
            track,
            momentum,
            training,
            backend,
            dtype,
            id="-".join(
                [
                    str(shape),
                    layout,
                    "affine" if affine else "noaffine",
                    "track" if track else "notrack",
                    str(momentum),
                    "train" if training else "eval",
                    backend,
                    str(dtype),
                ]
            ),
        )


@pytest.mark.parametrize(
    "shape,layout,affine,track,momentum,training,backend,dtype", list(module_grid())
)
def test_matches_torch_nn(shape, layout, affine, track, momentum, training, backend, dtype):
    """bnlab and torch.nn each within the derived bound of the float64 truth of their own state:
    bnlab is as close to the truth as torch.nn (never two float32 roundings compared)."""
    ours, theirs = make_pair(shape, dtype, affine, track, momentum, backend=backend)
    torch_dtype = TORCH_COMPUTE_DTYPE.get(dtype, dtype)
    theirs.to(torch_dtype)
    ours.train(training), theirs.train(training)
    for step in range(2):  # two steps: the running statistics and their momentum both matter
        x = make_input(shape, layout, dtype, seed=step)
        grad_out = make_input(shape, layout, dtype, seed=100 + step).detach()
        out, *_ = check_module_step(ours, x, grad_out, label=f"bnlab step {step}: ")
        assert out.is_contiguous(memory_format=x_format(x)), "output layout differs from input's"
        check_module_step(
            theirs, x.to(torch_dtype), grad_out.to(torch_dtype), label=f"torch.nn step {step}: "
        )
    if track:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def x_format(x):
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if (
            x.dim() == (4 if fmt is torch.channels_last else 5)
            and x.is_contiguous(memory_format=fmt)
            and not x.is_contiguous()
        ):
            return fmt
    return torch.contiguous_format


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,layout", list(shape_layouts()), ids=str)
def test_training_matches_reference(shape, layout, affine, momentum, backend):
    ours, _ = make_pair(shape, torch.float64, affine, True, momentum, backend=backend)
    running = [to_numpy(ours.running_mean), to_numpy(ours.running_var), 3]
    for step in range(2):
        x = make_input(shape, layout, torch.float64, seed=step)
        grad_out = make_input(shape, layout, torch.float64, seed=100 + step).detach()
        out, dx, dparams = run(ours, x, grad_out)
        ref_out, cache = reference.spatial_batchnorm_forward(
            to_numpy(x), to_numpy(ours.weight), to_numpy(ours.bias), ours.eps
        )
        ref_dx, ref_dw, ref_db = reference.spatial_batchnorm_backward(to_numpy(grad_out), cache)
        np.testing.assert_allclose(to_numpy(out), ref_out, atol=1e-10, rtol=1e-10)
        np.testing.assert_allclose(to_numpy(dx), ref_dx, atol=1e-10, rtol=1e-10)
        if affine:
            np.testing.assert_allclose(to_numpy(dparams[0]), ref_dw, atol=1e-10, rtol=1e-10)
            np.testing.assert_allclose(to_numpy(dparams[1]), ref_db, atol=1e-10, rtol=1e-10)
        xs = to_numpy(x)
        dims = tuple(d for d in range(xs.ndim) if d != 1)
        m = xs.size // xs.shape[1]
        running = reference.update_running_stats(
            running[0], running[1], xs.mean(axis=dims), xs.var(axis=dims), m, momentum, running[2]
        )
        np.testing.assert_allclose(to_numpy(ours.running_mean), running[0], atol=1e-12, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(ours.running_var), running[1], atol=1e-12, rtol=1e-12)
        assert int(ours.num_batches_tracked) == running[2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,layout", list(shape_layouts()), ids=str)
def test_eval_matches_reference(shape, layout, backend):
    ours, _ = make_pair(shape, torch.float64, True, True, 0.1, backend=backend)
    ours.eval()
    x = make_input(shape, layout, torch.float64, seed=0)
    expected = reference.batchnorm_eval_forward(
        to_numpy(x),
        to_numpy(ours.weight),
        to_numpy(ours.bias),
        to_numpy(ours.running_mean),
        to_numpy(ours.running_var),
        ours.eps,
    )
    np.testing.assert_allclose(to_numpy(ours(x)), expected, atol=1e-12, rtol=1e-12)


def test_rank_agnostic_module_matches_reference_on_rank_6():
    shape = (3, 4, 2, 3, 2, 2)
    bn = bnlab.nn.BatchNorm(4, dtype=torch.float64)
    x = make_input(shape, "contiguous", torch.float64, seed=0)
    expected, _ = reference.spatial_batchnorm_forward(to_numpy(x), None, None, bn.eps)
    np.testing.assert_allclose(to_numpy(bn(x)), expected, atol=1e-12)


@pytest.mark.parametrize(
    "cls,rank",
    [
        (bnlab.nn.BatchNorm1d, 4),
        (bnlab.nn.BatchNorm2d, 3),
        (bnlab.nn.BatchNorm3d, 4),
        (bnlab.nn.BatchNorm, 1),
    ],
)
def test_wrong_rank_is_an_error(cls, rank):
    with pytest.raises(ValueError, match=f"{rank}D input|rank >= 2"):
        cls(3)(torch.randn(*([3] * rank)))


def test_wrong_channel_count_names_both():
    with pytest.raises(
        ValueError, match=r"expects 3 channels on dim 1, got input of shape \(8, 4, 5, 5\)"
    ):
        bnlab.nn.BatchNorm2d(3, affine=False, track_running_stats=False)(torch.randn(8, 4, 5, 5))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"eps": 0.0}, "eps"), ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum")],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnlab.nn.BatchNorm2d(3, **kwargs)


def test_one_value_per_channel_in_training_is_an_error_and_leaves_state():
    bn = bnlab.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 4))
    assert int(bn.num_batches_tracked) == 0
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)  # fine in eval


NON_FINITE = {"inf": float("inf"), "nan": float("nan"), "overflowing variance": 3e38}


@pytest.mark.parametrize(
    "backend", [None, "native", "composite"]
)  # None: ATen's call, its own update
@pytest.mark.parametrize("momentum", [0.1, 0.0, None])
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_batch_leaves_running_statistics(strict, bad, momentum, backend):
    bn = bnlab.nn.BatchNorm2d(3, momentum=momentum, strict=strict, backend=backend)
    earlier = torch.randn(4, 3, 5, 5, requires_grad=True)
    pending = bn(earlier).square().sum()  # its backward runs after the bad batch
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[2, 1, 0, 0], x[3, 1, 0, 0] = NON_FINITE[bad], -NON_FINITE[bad]
    if strict:
        with pytest.raises(
            bnlab.NonFiniteStatisticsError, match=r"1 of 3 channels \(channels \[1\]\)"
        ):
            bn(x)
    else:
        bn(x)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    pending.backward()  # putting the statistics back did not invalidate the earlier graph
    assert torch.isfinite(earlier.grad).all()
    bn(torch.randn(4, 3, 5, 5))  # a finite batch updates again
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("held", [float("nan"), 1e30])
def test_finite_batch_counts_whatever_the_running_statistics_held(held):
    """A batch that was finite counts, and updates what it can, when the running statistics were
    not finite (or very large) before it, as in torch.nn."""
    ours, theirs = bnlab.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (ours, theirs):
        module.running_mean[0], module.running_var[:] = held, 1e30
        module(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, equal_nan=True, msg=key)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("change", ["none", "data", "buffer", "load_state_dict", "double"])
def test_guard_puts_back_into_the_buffers_the_layer_holds_now(change):
    """The eager training call keeps its copy of the running statistics between calls: after the
    buffers' storage or the buffers themselves change, a non-finite batch still leaves exactly the
    values the layer holds now."""
    bn = bnlab.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5))  # the decision and its snapshot are made
    if change == "data":
        bn.running_mean.data = torch.full((3,), 2.0)
    elif change == "buffer":
        bn.running_var = torch.full((3,), 3.0)
    elif change == "load_state_dict":
        bn.load_state_dict({**bn.state_dict(), "running_mean": torch.tensor([1.0, 2.0, 3.0])})
    elif change == "double":
        bn.double()
    dtype = bn.weight.dtype
    bn(torch.randn(4, 3, 5, 5, dtype=dtype))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    x[0, 2, 0, 0] = float("nan")
    bn(x)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("backend", [None, "native", "cpu", "composite"])
@pytest.mark.parametrize("shape", [(16, 8), (4, 8, 5, 5), (8, 8, 96, 96)])
def test_module_applied_twice_before_one_backward(backend, shape):
    """Two training calls of one module in one graph (e.g. a siamese net), then a backward: the
    second call's running-statistics update must not break the first call's backward, as with
    torch.nn."""
    ours, theirs = BNLAB_CLASS[len(shape)](8, backend=backend), TORCH_CLASS[len(shape)](8)
    a, b = torch.randn(shape), 3 * torch.randn(shape) + 1
    ga, gb = torch.randn(shape), torch.randn(shape)  # upstream gradients
    grads = []
    for module in (ours, theirs):
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ((module(xa) * ga).sum() + (module(xb) * gb).sum()).backward()
        grads.append((xa.grad, xb.grad, module.weight.grad, module.bias.grad))
    for mine, ref in zip(*grads):  # float32 sums over up to 73,728 values: relative to the largest
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_parametrized_weight_is_used():
    """The module reads its parameters from their registries for speed; a weight moved out by
    torch.nn.utils.parametrize must still be the one used."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ours, theirs = bnlab.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (ours, theirs):
        parametrize.register_parametrization(module, "weight", Doubled())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    assert not torch.allclose(ours(x), bnlab.nn.BatchNorm2d(3)(x))


def test_extra_repr_names_bnlab_options():
    assert "strict=True, backend='composite'" in repr(
        bnlab.nn.BatchNorm2d(3, strict=True, backend="composite")
    )


EMPTY_BATCH_MODULES = {
    "bnlab": lambda momentum, strict: bnlab.nn.BatchNorm2d(3, momentum=momentum, strict=strict),
    "converted": lambda momentum, strict: bnlab.convert(torch.nn.BatchNorm2d(3, momentum=momentum)),
    "bnlab act": lambda momentum, strict: bnlab.nn.BatchNormAct2d(
        3, momentum=momentum, strict=strict
    ),
}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", EMPTY_BATCH_MODULES)
def test_empty_training_batch_is_not_counted(kind, momentum, strict):
    """bnlab's choice (torch.nn counts it): an empty batch has no statistics, so it changes no
    running statistic and is not counted in num_batches_tracked, which would shift the weights of
    the cumulative average (momentum=None) of every later batch; strict mode does not call it
    non-finite. Its output and gradients are empty (and zero for the parameters)."""
    bn = EMPTY_BATCH_MODULES[kind](momentum, strict)
    first, second = torch.randn(4, 3, 2, 2), 3 * torch.randn(4, 3, 2, 2) + 1
    bn(first)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    out = bn(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape
    assert not bn.weight.grad.any()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    bn(second)  # the cumulative average weighs both real batches alike
    assert int(bn.num_batches_tracked) == 2
    if momentum is None:
        expected = (first.var((0, 2, 3)) + second.var((0, 2, 3))) / 2
        torch.testing.assert_close(bn.running_var, expected, rtol=1e-5, atol=1e-6)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    theirs(first), theirs(torch.randn(0, 3, 2, 2))
    assert int(theirs.num_batches_tracked) == 2  # the difference documented in the README


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, layout", [((6, 5), None), ((4, 8, 5, 7), torch.channels_last)])
def test_autocast_float32_model_matches_torch_nn_exactly(dtype, shape, layout):
    """A float32 model under CPU autocast gives its batch norm half activations with float32
    parameters and statistics: bnlab runs ATen's mixed-precision kernels both ways, as torch.nn
    does, so outputs, gradients and running statistics are torch.nn's, bit for bit (and as fast)."""
    c = shape[1]
    theirs = TORCH_CLASS[len(shape)](c)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.normal_(), theirs.running_var.fill_(2.0)
    ours = bnlab.nn.BatchNorm(c)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, dtype=torch.float64).mul(3).add(1).to(dtype)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    dy = torch.randn(shape).to(dtype)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        results.append((y, xi.grad, module.weight.grad, module.bias.grad))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    bad = x.clone()
    bad[0, 0] = float("nan")
    before = ours.running_mean.clone(), ours.running_var.clone()
    ours(bad)  # the guard: a non-finite batch leaves the statistics and is not counted
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert int(ours.num_batches_tracked) == 1


def test_eval_takes_the_short_path_only_when_nothing_else_is_asked(monkeypatch):
    """In eval a module runs ATen's op through the native backend's eager path (equal to the full
    path: the grids above compare it); a named backend, a statistics mode or a float16 input
    take the full path, and a bad argument is refused by name."""
    full = []
    monkeypatch.setattr(bnlab.functional, "batch_norm", lambda *a, **k: full.append(k) or a[0])
    x = torch.randn(4, 3, 5, 5)
    bn = bnlab.nn.BatchNorm2d(3).eval()
    torch.testing.assert_close(
        bn(x),
        torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias),
    )
    assert full == []
    for change in (
        lambda m: setattr(m, "backend", "composite"),
        lambda m: bnlab.nn.set_statistics(m, "batch"),
    ):
        layer = bnlab.nn.BatchNorm2d(3).eval()
        change(layer)
        layer(x)
        assert len(full) == 1, change
        full.clear()
    untracked = bnlab.nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(
        untracked(x), torch.nn.functional.batch_norm(x, None, None, None, None, True)
    )
    assert full == []  # batch statistics, nothing to update: ATen's op too
    bnlab.nn.BatchNorm2d(3, dtype=torch.float16).eval()(x.half())
    assert len(full) == 1
    layer = bnlab.nn.BatchNorm2d(3).eval()
    layer.register_buffer("running_var", torch.ones(4))
    with pytest.raises(ValueError, match=r"running_var has shape \(4,\), expected \(3,\)"):
        layer(x)


def test_decisions_kept_for_alternating_modes_and_input_sizes(monkeypatch):
    """Training and eval in turn, and a few input sizes (an epoch's last batch, multi-scale
    training), are each decided once; a ninth signature evicts the oldest, decided again when it
    returns. Every call still matches torch.nn."""
    decided = []
    eager_path = bnlab.functional.eager_path
    monkeypatch.setattr(
        bnlab.functional,
        "eager_path",
        lambda x, *a: decided.append(tuple(x.shape)) or eager_path(x, *a),
    )
    ours, theirs = bnlab.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    shapes = [(4, 3, s, s) for s in (5, 6, 7)]
    for _ in range(3):
        for shape in shapes:
            for training in (True, False):
                ours.train(training), theirs.train(training)
                x = torch.randn(shape)
                torch.testing.assert_close(ours(x), theirs(x))
    assert sorted(decided) == sorted(shapes * 2)  # once per (shape, mode)
    for size in (8, 9, 10):  # 9 signatures in all: the first one made is forgotten
        ours(torch.randn(4, 3, size, size))
    decided.clear()
    ours.train(), theirs.train()
    x = torch.randn(shapes[0])
    torch.testing.assert_close(ours(x), theirs(x))
    assert decided == [shapes[0]]
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_eval_decision_cached_per_signature_follows_every_change(monkeypatch):
    """The short path's checks run once per input signature; what changes after (the input's
    shape or layout, a vector replaced or converted, the backend registry, $BNLAB_BACKEND, the
    layer's options) is still seen: wrong input is refused with the full path's message and a
    new choice of backend takes effect."""
    x = torch.randn(4, 3, 5, 5)
    bn = bnlab.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2)

    def expected(inp, module=bn):
        return torch.nn.functional.batch_norm(
            inp, module.running_mean, module.running_var, module.weight, module.bias, eps=module.eps
        )

    for _ in range(2):  # the second call takes the cached decision
        torch.testing.assert_close(bn(x), expected(x))
    for copied in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):  # the decision stays here
        torch.testing.assert_close(copied(x), expected(x))
    cl = x.contiguous(memory_format=torch.channels_last)
    got = bn(cl)
    torch.testing.assert_close(got, expected(x))
    assert got.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="expects 3 channels"):
        bn(torch.randn(4, 5, 5, 5))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(4, 3, 5))
    bn.eps = 0.5  # part of the signature
    torch.testing.assert_close(bn(x), expected(x))
    bn.running_var = torch.ones(4)  # replaced under the cached decision: the full path says so
    with pytest.raises(ValueError, match="running_var"):
        bn(x)
    bn.running_var = torch.full((3,), 2.0)
    torch.testing.assert_close(bn(x), expected(x))
    bn.double()  # converted in place (same Parameter objects, new dtype): float32 input refused
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        bn(x)
    torch.testing.assert_close(bn(x.double()), expected(x.double()))

    full = []
    monkeypatch.setattr(bnlab.functional, "batch_norm", lambda *a, **k: full.append(k) or a[0])
    layer = bnlab.nn.BatchNorm2d(3).eval()
    layer(x)
    monkeypatch.setenv("BNLAB_BACKEND", "composite")
    layer(x)
    assert len(full) == 1  # the environment's backend is not native: the full path ran
    monkeypatch.delenv("BNLAB_BACKEND")
    layer(x)
    assert len(full) == 1
    taken = []
    composite = bnlab.kernels.get_backend("composite")
    bnlab.kernels.register_backend(
        "eager_test",
        composite.module,
        supports=lambda op, t: taken.append(op) or True,
        priority=100,
    )
    try:
        layer(x)  # a backend above native takes it now: full path, automatic selection
        assert len(full) == 2 and "batch_norm_eval" in taken
    finally:
        bnlab.kernels.unregister_backend("eager_test")
    layer(x)
    assert len(full) == 2


# ------------------------------------------------------------------ add_act: a residual unit's end


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 8, 9, 9), (4, 16, 128, 128)], ids=str)
def test_add_act_is_the_block_code_it_replaces(shape, training):
    """``bn.add_act(x, r)`` against ``y = bn(x); y += r; relu_(y)`` on torch.nn's layer: equal on
    small inputs (the same ATen ops run), within float32 rounding where bnlab's kernels fuse."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(shape[1]).train(training)
    with torch.no_grad():
        theirs.weight.uniform_(-2, 2), theirs.bias.normal_(), theirs.running_var.uniform_(0.5, 2)
    ours = bnlab.nn.BatchNorm2d(shape[1]).train(training)
    ours.load_state_dict(theirs.state_dict())
    x, r, dy = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    results = []
    for step in (lambda x, r: ours.add_act(x, r), lambda x, r: theirs(x).add_(r).relu_()):
        leaves = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = step(*leaves)
        y.backward(dy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    exact = shape[1] == 8
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-6)


def test_add_act_checks_the_residual_before_the_running_statistics_move():
    bn = bnlab.nn.BatchNorm2d(3)
    for residual, match in ((torch.zeros(2, 3, 4, 5), "shape"), (torch.zeros(2, 3, 4), "shape")):
        with pytest.raises(ValueError, match=match):
            bn.add_act(torch.randn(2, 3, 4, 4), residual)
    assert int(bn.num_batches_tracked) == 0 and not bn.running_mean.any()
    with pytest.raises(ValueError, match="after a residual addition"):
        bn.add_act(torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), "silu")


def test_add_act_with_prediction_time_statistics():
    torch.manual_seed(0)
    bn = bnlab.nn.BatchNorm2d(3).eval()
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    bnlab.nn.set_statistics(bn, "mix", alpha=0.3)
    x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(
        bn.add_act(x, r, "leaky_relu", 0.1), torch.nn.functional.leaky_relu(bn(x) + r, 0.1)
    )
