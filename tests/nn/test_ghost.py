"""bnlab.nn.GhostBatchNorm against batch norm applied virtual batch by virtual batch: bnlab's own op
in a loop and the float64 NumPy reference, over divisible and non-divisible batch sizes."""

import numpy as np
import pytest
import torch

import bnlab
from bnlab import reference
from bnlab.nn.ghost import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    ghost_batch_sizes,
)
from tolerances import FORWARD, GRADIENT, assert_close, assert_rounded_once, run, to_numpy

# (N, virtual_batch_size, the virtual batches' rows): divisible, a remainder merged into the last
# virtual batch (of 1 row included), and N < 2 * virtual_batch_size (one batch)
SPLITS = [
    (8, 4, [4, 4]),
    (12, 3, [3, 3, 3, 3]),
    (10, 4, [4, 6]),
    (9, 4, [4, 5]),
    (13, 4, [4, 4, 5]),
    (5, 2, [2, 3]),
    (7, 4, [7]),
    (3, 4, [3]),
]
TRAILING = {
    "2d": ((3,), "contiguous"),
    "3d": ((3, 4), "contiguous"),
    "4d": ((3, 2, 3), "contiguous"),
    "4d-channels_last": ((3, 2, 3), "channels_last"),
}
AFFINE = {"affine": {}, "noaffine": {"affine": False}, "nobias": {"bias": False}}


def make_input(shape, layout, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = module.num_features
    with torch.no_grad():
        for p in (module.weight, module.bias):
            if p is not None:
                p.copy_(torch.rand(c, generator=g) + 0.5)
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(c, generator=g))
            module.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            module.num_batches_tracked.fill_(3)
    return module


def per_chunk_bnlab(module, x, grad_out, sizes):
    """bnlab.functional.batch_norm on each virtual batch in turn (GhostBatchNorm vectorizes it)."""
    x = x.detach().clone().requires_grad_()
    params = [
        None if p is None else p.detach().clone().requires_grad_()
        for p in (module.weight, module.bias)
    ]
    out = torch.cat(
        [
            bnlab.batch_norm(chunk, None, None, *params, training=True, eps=module.eps)
            for chunk in torch.split(x, sizes)
        ]
    )
    out.backward(grad_out)
    return out, x.grad, [p.grad for p in params if p is not None]


def per_chunk_reference(module, x, grad_out, sizes):
    """reference.spatial_batchnorm_forward/backward per virtual batch; gamma/beta grads summed."""
    gamma, beta = to_numpy(module.weight), to_numpy(module.bias)
    outs, dxs, dgamma, dbeta = [], [], 0.0, 0.0
    for chunk, dchunk in zip(
        np.split(to_numpy(x), np.cumsum(sizes)[:-1]),
        np.split(to_numpy(grad_out), np.cumsum(sizes)[:-1]),
    ):
        out, cache = reference.spatial_batchnorm_forward(chunk, gamma, beta, module.eps)
        dx, dg, db = reference.spatial_batchnorm_backward(dchunk, cache)
        outs.append(out), dxs.append(dx)
        dgamma = dgamma if dg is None else dgamma + dg
        dbeta = dbeta if db is None else dbeta + db
    grads = [g for g, p in ((dgamma, gamma), (dbeta, beta)) if p is not None]
    return np.concatenate(outs), np.concatenate(dxs), grads


def reference_running_stats(x, sizes, running_mean, running_var, nbt, momentum):
    """The documented update: toward the row-weighted average of the virtual batches' means and
    unbiased variances, once per forward."""
    n = sum(sizes)
    stats = [reference._channel_stats(c) for c in np.split(x, np.cumsum(sizes)[:-1])]
    mean = sum(rows / n * mu for rows, (mu, _, _) in zip(sizes, stats))
    var = sum(rows / n * v * m / (m - 1) for rows, (_, v, m) in zip(sizes, stats))
    f = 1.0 / (nbt + 1) if momentum is None else momentum
    return (1 - f) * running_mean + f * mean, (1 - f) * running_var + f * var, nbt + 1


@pytest.mark.parametrize("n,vbs,sizes", SPLITS, ids=str)
def test_ghost_batch_sizes(n, vbs, sizes):
    assert ghost_batch_sizes(n, vbs) == sizes


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("rank", list(TRAILING))
@pytest.mark.parametrize("n,vbs,sizes", SPLITS, ids=str)
def test_matches_per_virtual_batch_batchnorm(n, vbs, sizes, rank, affine, momentum):
    trailing, layout = TRAILING[rank]
    shape = (n, *trailing)
    ours = randomize(
        GhostBatchNorm(
            shape[1],
            momentum=momentum,
            virtual_batch_size=vbs,
            dtype=torch.float64,
            **AFFINE[affine],
        )
    )
    running = [to_numpy(ours.running_mean), to_numpy(ours.running_var), 3]
    for step in range(2):
        x = make_input(shape, layout, torch.float64, seed=step)
        grad_out = make_input(shape, layout, torch.float64, seed=100 + step, requires_grad=False)
        loop_out, loop_dx, loop_grads = per_chunk_bnlab(ours, x, grad_out, sizes)
        ref_out, ref_dx, ref_grads = per_chunk_reference(ours, x, grad_out, sizes)
        out, dx, grads = run(ours, x, grad_out)
        assert out.stride() == x.stride() and dx.stride() == x.stride()
        for expected in (loop_out, torch.from_numpy(ref_out)):
            assert_close(out, expected, torch.float64, FORWARD)
        for expected in (loop_dx, torch.from_numpy(ref_dx)):
            assert_close(dx, expected, torch.float64, GRADIENT)
        assert len(grads) == len(loop_grads) == len(ref_grads)
        for grad, loop_grad, ref_grad in zip(grads, loop_grads, ref_grads):
            assert_close(grad, loop_grad, torch.float64, GRADIENT)
            assert_close(grad, torch.from_numpy(ref_grad), torch.float64, GRADIENT)
        running = reference_running_stats(to_numpy(x), sizes, *running, momentum)
        np.testing.assert_allclose(to_numpy(ours.running_mean), running[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(ours.running_var), running[1], rtol=1e-12, atol=1e-14)
        assert int(ours.num_batches_tracked) == running[2]


def test_running_mean_moves_toward_the_whole_batch_mean():
    ghost = GhostBatchNorm1d(2, momentum=1.0, virtual_batch_size=3, dtype=torch.float64)
    x = make_input((11, 2), "contiguous", torch.float64, seed=0)  # virtual batches of 3, 3, 5
    ghost(x)
    torch.testing.assert_close(ghost.running_mean, x.detach().mean(0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("n", [2, 5, 7])
def test_small_batch_is_batchnorm_exactly(n, momentum):
    ours = randomize(GhostBatchNorm2d(3, momentum=momentum, virtual_batch_size=4))
    bn = bnlab.nn.BatchNorm2d(3, momentum=momentum)
    bn.load_state_dict(ours.state_dict())
    for step in range(2):
        x = make_input((n, 3, 4, 4), "contiguous", torch.float32, seed=step)
        grad_out = make_input((n, 3, 4, 4), "contiguous", torch.float32, 100 + step, False)
        (out, dx, grads), (bn_out, bn_dx, bn_grads) = run(ours, x, grad_out), run(bn, x, grad_out)
        assert torch.equal(out, bn_out) and torch.equal(dx, bn_dx)
        assert all(torch.equal(a, b) for a, b in zip(grads, bn_grads))
        for name, buffer in bn.named_buffers():
            assert torch.equal(getattr(ours, name), buffer), name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_is_batchnorm_eval(layout):
    ours = randomize(GhostBatchNorm2d(3, virtual_batch_size=4, dtype=torch.float64))
    for seed in range(3):
        ours(make_input((12, 3, 2, 2), layout, torch.float64, seed))
    ours.eval()
    bn = bnlab.nn.BatchNorm2d(3, dtype=torch.float64).eval()
    bn.load_state_dict(ours.state_dict())
    x = make_input((12, 3, 2, 2), layout, torch.float64, seed=9)
    grad_out = make_input((12, 3, 2, 2), layout, torch.float64, seed=99, requires_grad=False)
    (out, dx, grads), (bn_out, bn_dx, bn_grads) = run(ours, x, grad_out), run(bn, x, grad_out)
    assert torch.equal(out, bn_out) and torch.equal(dx, bn_dx)
    assert all(torch.equal(a, b) for a, b in zip(grads, bn_grads))
    assert int(ours.num_batches_tracked) == 6


def test_without_running_stats():
    ours = randomize(
        GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False, dtype=torch.float64)
    )
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = make_input((10, 3), "contiguous", torch.float64, seed=0)
    grad_out = make_input((10, 3), "contiguous", torch.float64, seed=1, requires_grad=False)
    out, dx, _ = run(ours, x, grad_out)
    loop_out, loop_dx, _ = per_chunk_bnlab(ours, x, grad_out, [4, 6])
    assert_close(out, loop_out, torch.float64, FORWARD)
    assert_close(dx, loop_dx, torch.float64, GRADIENT)
    ours.eval()  # batch statistics over the whole batch, as BatchNorm(track_running_stats=False)
    bn = bnlab.nn.BatchNorm1d(3, track_running_stats=False, dtype=torch.float64).eval()
    bn.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), bn(x))


def test_state_dict_is_batchnorms():
    ghost = GhostBatchNorm2d(3, virtual_batch_size=4)
    assert list(ghost.state_dict()) == list(bnlab.nn.BatchNorm2d(3).state_dict())
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(8, 3, 2, 2))
    ghost.load_state_dict(theirs.state_dict())
    ghost(torch.randn(8, 3, 2, 2))
    theirs.load_state_dict(ghost.state_dict())
    assert int(theirs.num_batches_tracked) == 2


def test_bfloat16_is_close_to_float32():
    ours = randomize(GhostBatchNorm2d(3, virtual_batch_size=4))
    ref = randomize(GhostBatchNorm2d(3, virtual_batch_size=4))
    x = make_input((10, 3, 4, 4), "channels_last", torch.float32, seed=0).detach().bfloat16()
    out, expected = ours(x), ref(x.float())
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert_rounded_once(out, expected)
    assert ours.running_var.dtype == torch.float32
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_batch_leaves_running_statistics(strict):
    ghost = GhostBatchNorm2d(3, virtual_batch_size=4, strict=strict)
    ghost(torch.randn(12, 3, 2, 2))
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    x = torch.randn(12, 3, 2, 2)
    x[9, 1, 0, 0] = float("nan")  # the last virtual batch, channel 1
    if strict:
        match = r"1 of 3 channels \(channels \[1\]\)"
        with pytest.raises(bnlab.NonFiniteStatisticsError, match=match):
            ghost(x)
    else:
        out = ghost(x)
        assert torch.isfinite(out[:8]).all() and torch.isfinite(out[8:, [0, 2]]).all()
    for key, value in ghost.state_dict().items():
        assert torch.equal(value, before[key]), key
    ghost(torch.randn(12, 3, 2, 2))
    assert int(ghost.num_batches_tracked) == 2


@pytest.mark.parametrize("vbs", [1, 0, -4, 2.5, "8", None])
def test_bad_virtual_batch_size(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 2"):
        GhostBatchNorm(3, virtual_batch_size=vbs)


def test_input_checks_and_repr():
    with pytest.raises(ValueError, match="expected 5D input"):
        GhostBatchNorm3d(3)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="expects 3 channels on dim 1"):
        GhostBatchNorm(3, virtual_batch_size=2)(torch.randn(8, 4))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        GhostBatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(TypeError, match="expects a floating-point input"):
        GhostBatchNorm1d(3, virtual_batch_size=2)(torch.ones(8, 3, dtype=torch.long))
    assert "virtual_batch_size=32" in repr(GhostBatchNorm2d(3, virtual_batch_size=32))
    assert GhostBatchNorm(3).virtual_batch_size == 128


def test_public_names():
    assert (
        bnlab.nn.GhostBatchNorm,
        bnlab.nn.GhostBatchNorm1d,
        bnlab.nn.GhostBatchNorm2d,
        bnlab.nn.GhostBatchNorm3d,
    ) == (GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d)
    assert {"GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"} <= set(
        bnlab.nn.__all__
    )
