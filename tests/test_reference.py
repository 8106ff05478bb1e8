"""Tests for bnlab.reference: cs231n sanity checks, numeric gradients, analytic facts, torch
cross-checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab import reference as ref

SPATIAL_SHAPES = [(2, 3), (60, 100), (8, 16, 5, 5), (4, 3, 2, 5, 5), (1, 4, 7, 7)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _affine_data(rng, n, W, b):
    """(n, 3) features with unequal means/scales, mixed by a fixed random affine layer."""
    return (rng.standard_normal((n, 3)) * [1.0, 2.0, 3.0] + [5.0, -2.0, 10.0]) @ W + b


def _params(rng, c):
    return rng.standard_normal(c), rng.standard_normal(c)


def _t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _max_abs(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b)))


# --- cs231n sanity checks (its batch-norm assignment) --------------------------------------------


def test_train_forward_standardizes(rng):
    x = _affine_data(rng, 200, rng.standard_normal((3, 3)), rng.standard_normal(3))
    out, _ = ref.batchnorm_forward(x, np.ones(3), np.zeros(3))
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-5)


def test_train_forward_applies_gamma_beta(rng):
    x = _affine_data(rng, 200, rng.standard_normal((3, 3)), rng.standard_normal(3))
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([11.0, 12.0, 13.0])
    out, _ = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(out.mean(axis=0), beta, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), gamma, atol=1e-5)


def test_eval_forward_after_running_stats(rng):
    W, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
    gamma, beta = np.ones(3), np.zeros(3)
    mean, var, tracked = np.zeros(3), np.ones(3), 0
    for _ in range(50):
        x = _affine_data(rng, 200, W, b)
        ref.batchnorm_forward(x, gamma, beta)
        mean, var, tracked = ref.update_running_stats(
            mean, var, x.mean(0), x.var(0), 200, 0.1, tracked
        )
    assert tracked == 50
    # A large eval batch keeps its own sampling noise (~1/sqrt(n)) well below the 0.1 tolerance.
    out = ref.batchnorm_eval_forward(_affine_data(rng, 10_000, W, b), gamma, beta, mean, var)
    assert np.all(np.abs(out.mean(axis=0)) < 0.1)
    assert np.all(np.abs(out.std(axis=0) - 1.0) < 0.1)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("backward", [ref.batchnorm_backward_staged, ref.batchnorm_backward])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_numeric_gradient(rng, backward, affine):
    x = 5 * rng.standard_normal((4, 5)) + 12
    gamma, beta = _params(rng, 5) if affine else (None, None)
    dout = rng.standard_normal((4, 5))
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dout, cache)
    num_dx = ref.numeric_gradient(lambda v: ref.batchnorm_forward(v, gamma, beta)[0], x, dout)
    assert ref.rel_error(dx, num_dx) < 1e-7
    if not affine:
        assert dgamma is None and dbeta is None
        return
    num_dgamma = ref.numeric_gradient(lambda g: ref.batchnorm_forward(x, g, beta)[0], gamma, dout)
    num_dbeta = ref.numeric_gradient(lambda b: ref.batchnorm_forward(x, gamma, b)[0], beta, dout)
    assert ref.rel_error(dgamma, num_dgamma) < 1e-7
    assert ref.rel_error(dbeta, num_dbeta) < 1e-7


def test_closed_form_matches_staged(rng):
    x = 3 * rng.standard_normal((50, 7)) - 4
    gamma, beta = _params(rng, 7)
    dout = rng.standard_normal((50, 7))
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    staged, compact = (
        ref.batchnorm_backward_staged(dout, cache),
        ref.batchnorm_backward(dout, cache),
    )
    for s, c in zip(staged, compact):
        assert ref.rel_error(s, c) < 1e-12


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_spatial_numeric_gradient(rng, shape):
    c = shape[1]
    x = 2 * rng.standard_normal(shape) + 1
    gamma, beta = _params(rng, c)
    dout = rng.standard_normal(shape)
    _, cache = ref.spatial_batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = ref.spatial_batchnorm_backward(dout, cache)
    assert dx.shape == shape
    num_dx = ref.numeric_gradient(
        lambda v: ref.spatial_batchnorm_forward(v, gamma, beta)[0], x, dout
    )
    num_dgamma = ref.numeric_gradient(
        lambda g: ref.spatial_batchnorm_forward(x, g, beta)[0], gamma, dout
    )
    num_dbeta = ref.numeric_gradient(
        lambda b: ref.spatial_batchnorm_forward(x, gamma, b)[0], beta, dout
    )
    assert ref.rel_error(dx, num_dx) < 1e-7
    assert ref.rel_error(dgamma, num_dgamma) < 1e-7
    assert ref.rel_error(dbeta, num_dbeta) < 1e-7


@pytest.mark.parametrize("shape,normalized_ndim", [((4, 6), 1), ((3, 2, 5), 1), ((3, 3, 4), 2)])
def test_layernorm_numeric_gradient(rng, shape, normalized_ndim):
    x = 2 * rng.standard_normal(shape) + 3
    feature_shape = shape[-normalized_ndim:]
    gamma, beta = rng.standard_normal(feature_shape), rng.standard_normal(feature_shape)
    dout = rng.standard_normal(shape)

    def f(v, g, b):
        return ref.layernorm_forward(v, g, b, normalized_ndim=normalized_ndim)[0]

    _, cache = ref.layernorm_forward(x, gamma, beta, normalized_ndim=normalized_ndim)
    dx, dgamma, dbeta = ref.layernorm_backward(dout, cache)
    assert ref.rel_error(dx, ref.numeric_gradient(lambda v: f(v, gamma, beta), x, dout)) < 1e-7
    assert ref.rel_error(dgamma, ref.numeric_gradient(lambda g: f(x, g, beta), gamma, dout)) < 1e-7
    assert ref.rel_error(dbeta, ref.numeric_gradient(lambda b: f(x, gamma, b), beta, dout)) < 1e-7


def test_numeric_gradient_restores_input_and_rejects_float32(rng):
    x = rng.standard_normal((3, 4))
    before = x.copy()
    grad = ref.numeric_gradient(lambda v: v**2, x, np.ones_like(x))
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(grad, 2 * x, rtol=1e-8)
    with pytest.raises(TypeError):
        ref.numeric_gradient(lambda v: v, x.astype(np.float32), np.ones_like(x))


def test_rel_error():
    assert ref.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert ref.rel_error([1.0, 3.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert ref.rel_error([0.0], [1e-9]) == pytest.approx(0.1)  # denominator floored at 1e-8


# --- analytic facts (Ioffe & Szegedy 2015, section 3) --------------------------------------------


@pytest.mark.parametrize("m", [2, 5])
def test_population_statistics_of_constructed_batches(rng, m):
    c, n_batches = 3, 6
    mus = rng.standard_normal((n_batches, c)) * 4
    variances = rng.uniform(0.5, 3.0, (n_batches, c))
    batches = []
    for mu, var in zip(mus, variances):
        z = rng.standard_normal((m, c, 2, 3))
        z = (z - z.mean(axis=(0, 2, 3), keepdims=True)) / z.std(axis=(0, 2, 3), keepdims=True)
        batches.append(
            z * np.sqrt(var)[:, None, None] + mu[:, None, None]
        )  # batch stats exactly (mu, var)
    mean, var = ref.population_statistics(iter(batches))
    per_channel = m * 2 * 3
    np.testing.assert_allclose(mean, mus.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        var, per_channel / (per_channel - 1) * variances.mean(axis=0), rtol=1e-12
    )


def test_population_statistics_of_one_batch_is_unbiased(rng):
    x = rng.standard_normal((40, 5)) * 3 + 1
    mean, var = ref.population_statistics([x])
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=0, ddof=1), rtol=1e-12)


def test_unbiased_variance_needs_two_values():
    with pytest.raises(ValueError):
        ref.population_statistics([np.ones((1, 3))])
    with pytest.raises(ValueError):
        ref.update_running_stats(np.zeros(3), np.ones(3), np.zeros(3), np.zeros(3), m=1)
    with pytest.raises(ValueError):
        ref.population_statistics([np.ones((4, 3)), np.ones((5, 3))])


@pytest.mark.parametrize("affine", [True, False])
def test_fold_affine_equals_eval_forward(rng, affine):
    x = rng.standard_normal((8, 4, 3, 3)) * 2 + 1
    gamma, beta = _params(rng, 4) if affine else (None, None)
    mean, var = rng.standard_normal(4), rng.uniform(0.1, 4.0, 4)
    scale, shift = ref.fold_affine(gamma, beta, mean, var)
    folded = scale[:, None, None] * x + shift[:, None, None]
    expected = ref.batchnorm_eval_forward(x, gamma, beta, mean, var)
    assert ref.rel_error(folded, expected) < 1e-12


def test_identity_is_recoverable(rng):
    # gamma = sqrt(Var[x] + eps), beta = E[x] undoes the normalization (Ioffe & Szegedy 2015,
    # section 3).
    x = rng.standard_normal((30, 4)) * [1.0, 2.0, 3.0, 4.0] + [0.0, -5.0, 5.0, 9.0]
    out, _ = ref.batchnorm_forward(x, np.sqrt(x.var(axis=0) + 1e-5), x.mean(axis=0))
    np.testing.assert_allclose(out, x, atol=1e-12)


def test_scale_invariance(rng):
    # BN(Wu) = BN((aW)u) holds exactly only without eps; use eps=0 for the paper's statement.
    a, eps = 7.3, 0.0
    u, W = rng.standard_normal((16, 5)), rng.standard_normal((4, 5))
    dout = rng.standard_normal((16, 4))
    out, cache = ref.spatial_batchnorm_forward(u @ W.T, None, None, eps)
    out_a, cache_a = ref.spatial_batchnorm_forward(u @ (a * W).T, None, None, eps)
    np.testing.assert_allclose(out_a, out, rtol=0, atol=1e-10)
    dx, _, _ = ref.spatial_batchnorm_backward(dout, cache)
    dx_a, _, _ = ref.spatial_batchnorm_backward(dout, cache_a)
    np.testing.assert_allclose(dx_a @ (a * W), dx @ W, rtol=0, atol=1e-10)  # dBN/du unchanged
    np.testing.assert_allclose(
        dx_a.T @ u, (dx.T @ u) / a, rtol=0, atol=1e-10
    )  # dBN/d(aW) = dBN/dW / a


# --- cross-checks against torch (float64) -----------------------------------------------------


@pytest.mark.parametrize("shape", SPATIAL_SHAPES)
def test_spatial_forward_backward_match_torch(rng, shape):
    c = shape[1]
    x = rng.standard_normal(shape) * 3 + 2
    gamma, beta = _params(rng, c)
    dout = rng.standard_normal(shape)
    out, cache = ref.spatial_batchnorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = ref.spatial_batchnorm_backward(dout, cache)

    tx, tg, tb = _t(x, True), _t(gamma, True), _t(beta, True)
    tout = F.batch_norm(tx, None, None, tg, tb, training=True, eps=1e-5)
    (tout * _t(dout)).sum().backward()
    assert _max_abs(out, tout.detach().numpy()) < 1e-10
    assert _max_abs(dx, tx.grad.numpy()) < 1e-10
    assert _max_abs(dgamma, tg.grad.numpy()) < 1e-10
    assert _max_abs(dbeta, tb.grad.numpy()) < 1e-10


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6, 6), (2, 3, 2, 4, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_matches_torch(rng, shape, affine):
    c = shape[1]
    x = rng.standard_normal(shape) * 2 - 1
    gamma, beta = _params(rng, c) if affine else (None, None)
    mean, var = rng.standard_normal(c), rng.uniform(0.1, 3.0, c)
    out = ref.batchnorm_eval_forward(x, gamma, beta, mean, var, eps=1e-3)
    weight, bias = (_t(gamma), _t(beta)) if affine else (None, None)
    expected = F.batch_norm(_t(x), _t(mean), _t(var), weight, bias, training=False, eps=1e-3)
    assert _max_abs(out, expected.numpy()) < 1e-10


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_matches_torch_buffers(rng, momentum):
    c, m = 4, 10
    bn = torch.nn.BatchNorm1d(c, momentum=momentum).double().train()
    mean, var, tracked = np.zeros(c), np.ones(c), 0
    for _ in range(3):
        x = rng.standard_normal((m, c)) * 2 + 3
        bn(_t(x))
        mean, var, tracked = ref.update_running_stats(
            mean, var, x.mean(0), x.var(0), m, momentum, tracked
        )
        assert _max_abs(mean, bn.running_mean.numpy()) < 1e-12
        assert _max_abs(var, bn.running_var.numpy()) < 1e-12
        assert tracked == bn.num_batches_tracked.item()


def test_update_running_stats_leaves_inputs_untouched(rng):
    arrays = [rng.standard_normal(3) for _ in range(4)]
    copies = [a.copy() for a in arrays]
    ref.update_running_stats(*arrays, m=8)
    for a, original in zip(arrays, copies):
        np.testing.assert_array_equal(a, original)


@pytest.mark.parametrize(
    "shape,normalized_ndim", [((6, 10), 1), ((2, 5, 8), 1), ((4, 3, 5), 2), ((1, 7), 1)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_matches_torch(rng, shape, normalized_ndim, affine):
    feature_shape = shape[-normalized_ndim:]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = (None, None)
    if affine:
        gamma, beta = rng.standard_normal(feature_shape), rng.standard_normal(feature_shape)
    dout = rng.standard_normal(shape)
    out, cache = ref.layernorm_forward(x, gamma, beta, normalized_ndim=normalized_ndim)
    dx, dgamma, dbeta = ref.layernorm_backward(dout, cache)

    tx = _t(x, True)
    tg, tb = (_t(gamma, True), _t(beta, True)) if affine else (None, None)
    tout = F.layer_norm(tx, feature_shape, tg, tb, eps=1e-5)
    (tout * _t(dout)).sum().backward()
    assert _max_abs(out, tout.detach().numpy()) < 1e-10
    assert _max_abs(dx, tx.grad.numpy()) < 1e-10
    if affine:
        assert _max_abs(dgamma, tg.grad.numpy()) < 1e-10
        assert _max_abs(dbeta, tb.grad.numpy()) < 1e-10
    else:
        assert dgamma is None and dbeta is None
