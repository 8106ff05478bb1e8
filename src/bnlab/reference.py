"""Float64 NumPy reference for batch and layer normalization: the oracle every other bnlab
implementation is tested against.

Written to be read beside the papers, not to be fast:

- Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by Reducing
  Internal Covariate Shift", https://arxiv.org/abs/1502.03167 (Algorithm 1: the training
  transform; Algorithm 2: inference with population statistics).
- Ba, Kiros & Hinton 2016, "Layer Normalization", https://arxiv.org/abs/1607.06450.

Conventions (PyTorch's; Ioffe & Szegedy 2015, section 3): the normalization uses the *biased* batch
variance; running / population variances store the *unbiased* one (times m/(m-1)). Everything is
computed in float64. ``gamma=None`` / ``beta=None`` mean "no scale" / "no shift" (1 and 0); the
matching gradients are then returned as ``None``.
"""

import numpy as np


def _f64(a):
    """Return a as a float64 array, or None if a is None."""
    return None if a is None else np.asarray(a, dtype=np.float64)


def _normalize(x, axis, eps):
    """xhat = (x - mu) / sqrt(var + eps) with mu, biased var reduced over `axis` (kept as dims)."""
    mu = np.mean(x, axis=axis, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=axis, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    return (x - mu) * invstd, mu, var, invstd


def _affine(xhat, gamma, beta):
    """y = gamma * xhat + beta, where a None parameter is skipped."""
    out = xhat if gamma is None else gamma * xhat
    return out if beta is None else out + beta


def _affine_grads(dout, xhat, gamma, beta, axis):
    """dgamma = sum dout * xhat, dbeta = sum dout over `axis` (None for a missing parameter)."""
    dgamma = None if gamma is None else np.sum(dout * xhat, axis=axis)
    dbeta = None if beta is None else np.sum(dout, axis=axis)
    return dgamma, dbeta


def _dx_closed_form(dxhat, xhat, invstd, axis):
    """dx = invstd/m * (m*dxhat - sum dxhat - xhat * sum(dxhat*xhat)), sums over the m of `axis`."""
    m = np.prod([dxhat.shape[a] for a in np.atleast_1d(axis)])
    sum_dxhat = np.sum(dxhat, axis=axis, keepdims=True)
    sum_dxhat_xhat = np.sum(dxhat * xhat, axis=axis, keepdims=True)
    return invstd / m * (m * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)


def _channel_params(p, ndim):
    """Reshape a per-channel (C,) parameter to (C, 1, ..., 1) so it broadcasts over (N, C, *)."""
    return None if p is None else _f64(p).reshape((-1,) + (1,) * (ndim - 2))


def _to_rows(x):
    """(N, C, *) -> (m, C) with m = N * prod(*): one row per (example, position)."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _from_rows(rows, moved_shape):
    """Inverse of `_to_rows`: (m, C) -> (N, *, C) -> (N, C, *)."""
    return np.moveaxis(rows.reshape(moved_shape), -1, 1)


def _channel_stats(x):
    """Per-channel mean and biased variance of x of shape (N, C, *), and m = values per channel."""
    rows = _to_rows(_f64(x))
    return rows.mean(axis=0), rows.var(axis=0), rows.shape[0]


def _unbiased(var, m):
    """var * m/(m-1); undefined for one value per channel, so refuse instead of returning inf."""
    if m < 2:
        raise ValueError(
            f"Expected more than 1 value per channel for an unbiased variance, got m={m}"
        )
    return var * m / (m - 1)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Batch-normalizing transform, Algorithm 1, for x of shape (m, D) (one feature per column).

        mu_B   = (1/m) sum_i x_i
        var_B  = (1/m) sum_i (x_i - mu_B)^2        (biased)
        xhat_i = (x_i - mu_B) / sqrt(var_B + eps)
        y_i    = gamma * xhat_i + beta

    Args:
        x: array (m, D).
        gamma, beta: arrays (D,) or None (no scale / no shift).
        eps: added to the variance for numerical stability.

    Returns:
        (out, cache): out of shape (m, D); cache for the backward functions.
    """
    x, gamma, beta = _f64(x), _f64(gamma), _f64(beta)
    xhat, mu, var, invstd = _normalize(x, 0, eps)
    cache = dict(x=x, mu=mu, var=var, eps=eps, invstd=invstd, xhat=xhat, gamma=gamma, beta=beta)
    return _affine(xhat, gamma, beta), cache


def batchnorm_backward_staged(dout, cache):
    """Backward of `batchnorm_forward` by the paper's chain rule, one stage per line.

    Ioffe & Szegedy 2015, section 3::

        dl/dxhat_i = dl/dy_i * gamma
        dl/dvar_B  = sum_i dl/dxhat_i * (x_i - mu_B) * (-1/2) (var_B + eps)^(-3/2)
        dl/dmu_B   = sum_i dl/dxhat_i * (-1/sqrt(var_B + eps))
                     + dl/dvar_B * sum_i -2 (x_i - mu_B) / m
        dl/dx_i    = dl/dxhat_i / sqrt(var_B + eps) + dl/dvar_B * 2 (x_i - mu_B) / m + dl/dmu_B / m
        dl/dgamma  = sum_i dl/dy_i * xhat_i
        dl/dbeta   = sum_i dl/dy_i

    Args:
        dout: upstream gradient dl/dy, shape (m, D).
        cache: from `batchnorm_forward`.

    Returns:
        (dx, dgamma, dbeta): dx of shape (m, D); dgamma, dbeta of shape (D,) or None.
    """
    dout = _f64(dout)
    x, mu, var, eps, gamma = cache["x"], cache["mu"], cache["var"], cache["eps"], cache["gamma"]
    m = x.shape[0]
    xmu = x - mu
    dxhat = dout if gamma is None else dout * gamma
    dvar = np.sum(dxhat * xmu, axis=0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(dxhat * -1.0 / np.sqrt(var + eps), axis=0) + dvar * np.sum(-2.0 * xmu, axis=0) / m
    dx = dxhat / np.sqrt(var + eps) + dvar * 2.0 * xmu / m + dmu / m
    return (dx,) + _affine_grads(dout, cache["xhat"], gamma, cache["beta"], 0)


def batchnorm_backward(dout, cache):
    """Backward of `batchnorm_forward` in the compact closed form (one reduction pass).

        invstd  = 1 / sqrt(var_B + eps)
        dl/dx_i = (gamma * invstd / m) * (m * dy_i - sum_j dy_j - xhat_i * sum_j dy_j * xhat_j)

    Same arguments, and the same values up to rounding, as `batchnorm_backward_staged`.
    """
    dout = _f64(dout)
    gamma, xhat = cache["gamma"], cache["xhat"]
    dxhat = dout if gamma is None else dout * gamma
    dx = _dx_closed_form(dxhat, xhat, cache["invstd"], 0)
    return (dx,) + _affine_grads(dout, xhat, gamma, cache["beta"], 0)


def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Per-channel ("spatial") batch norm for x of shape (N, C, *) with zero or more trailing dims.

    One (gamma, beta) and one set of statistics per channel, computed over the batch and all
    positions, i.e. over m = N * prod(spatial) values (the paper's m*p*q for convolutions).
    This is Algorithm 1 applied to x with C moved last and flattened to (m, C).

    Args:
        x: array (N, C, *); (N, C) is plain batch norm.
        gamma, beta: arrays (C,) or None.
        eps: added to the variance.

    Returns:
        (out, cache): out of x's shape; cache for `spatial_batchnorm_backward`.
    """
    x = _f64(x)
    moved_shape = np.moveaxis(x, 1, -1).shape
    out, bn_cache = batchnorm_forward(_to_rows(x), gamma, beta, eps)
    return _from_rows(out, moved_shape), dict(bn=bn_cache, moved_shape=moved_shape)


def spatial_batchnorm_backward(dout, cache):
    """Backward of `spatial_batchnorm_forward`: the (m, C) closed form, reshaped back.

    Args:
        dout: upstream gradient, shape (N, C, *).
        cache: from `spatial_batchnorm_forward`.

    Returns:
        (dx, dgamma, dbeta): dx of x's shape; dgamma, dbeta of shape (C,) or None.
    """
    dx, dgamma, dbeta = batchnorm_backward(_to_rows(_f64(dout)), cache["bn"])
    return _from_rows(dx, cache["moved_shape"]), dgamma, dbeta


def batchnorm_eval_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Inference-mode batch norm, Algorithm 2 step 11, for x of shape (N, C, *).

        y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta

    The output depends on the input alone: E[x], Var[x] are fixed (running or population) values.

    Args:
        x: array (N, C, *).
        gamma, beta: arrays (C,) or None (meaning 1 and 0).
        running_mean, running_var: arrays (C,), the E[x] and Var[x] above.
        eps: added to the variance.

    Returns:
        out of x's shape.
    """
    x = _f64(x)
    mean, var = _channel_params(running_mean, x.ndim), _channel_params(running_var, x.ndim)
    xhat = (x - mean) / np.sqrt(var + eps)
    return _affine(xhat, _channel_params(gamma, x.ndim), _channel_params(beta, x.ndim))


def update_running_stats(
    running_mean, running_var, batch_mean, batch_var, m, momentum=0.1, num_batches_tracked=0
):
    """One moving-average update of the running statistics, PyTorch's convention.

        f            = momentum  (or 1/(num_batches_tracked + 1) if momentum is None)
        running_mean = (1 - f) * running_mean + f * batch_mean
        running_var  = (1 - f) * running_var  + f * batch_var * m/(m-1)

    running_var tracks the *unbiased* batch variance, while normalization uses the biased one.
    momentum=None is the cumulative (equal-weight) average of all batches seen.

    Args:
        running_mean, running_var: arrays (C,), current running statistics.
        batch_mean, batch_var: arrays (C,), this batch's mean and *biased* variance.
        m: number of values per channel in the batch (N * prod(spatial)); must be >= 2.
        momentum: f above, or None for the cumulative average.
        num_batches_tracked: batches already averaged in.

    Returns:
        (new_mean, new_var, new_num_batches_tracked); new arrays, the inputs are not modified.
    """
    f = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    new_mean = (1 - f) * _f64(running_mean) + f * _f64(batch_mean)
    new_var = (1 - f) * _f64(running_var) + f * _unbiased(_f64(batch_var), m)
    return new_mean, new_var, num_batches_tracked + 1


def population_statistics(batches):
    """Exact population statistics of training mini-batches: Algorithm 2 steps 8-10, precise BN.

        E[x]   = E_B[mu_B]
        Var[x] = m/(m-1) * E_B[var_B]          (var_B biased, so Var[x] is unbiased)

    Args:
        batches: iterable of arrays (N, C, *), all with the same m = N * prod(spatial) per channel.

    Returns:
        (mean, var): arrays (C,).
    """
    means, variances, sizes = zip(*(_channel_stats(b) for b in batches))
    if len(set(sizes)) != 1:
        raise ValueError(
            f"All batches need the same number of values per channel, got {sorted(set(sizes))}"
        )
    return np.mean(means, axis=0), _unbiased(np.mean(variances, axis=0), sizes[0])


def fold_affine(gamma, beta, mean, var, eps=1e-5):
    """Algorithm 2 step 11 as one affine map y = scale * x + shift (foldable into a previous layer).

        scale = gamma / sqrt(var + eps)
        shift = beta - gamma * mean / sqrt(var + eps)

    Args:
        gamma, beta: arrays (C,) or None (meaning 1 and 0).
        mean, var: arrays (C,), the inference statistics E[x], Var[x].
        eps: added to the variance.

    Returns:
        (scale, shift): arrays (C,).
    """
    mean, var = _f64(mean), _f64(var)
    gamma = np.ones_like(mean) if gamma is None else _f64(gamma)
    beta = np.zeros_like(mean) if beta is None else _f64(beta)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - scale * mean


def layernorm_forward(x, gamma, beta, eps=1e-5, normalized_ndim=1):
    """Layer normalization (Ba et al. 2016): normalize each example over its own features.

        mu_n   = mean of x_n over the last `normalized_ndim` dims (H values)
        var_n  = biased variance of x_n over the same dims
        y_n    = gamma * (x_n - mu_n) / sqrt(var_n + eps) + beta

    No batch statistics, so training and inference are the same computation.

    Args:
        x: array whose last `normalized_ndim` dims are the features.
        gamma, beta: arrays of shape x.shape[-normalized_ndim:] or None.
        eps: added to the variance.
        normalized_ndim: how many trailing dims form one example's features.

    Returns:
        (out, cache): out of x's shape; cache for `layernorm_backward`.
    """
    x, gamma, beta = _f64(x), _f64(gamma), _f64(beta)
    feature_axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    xhat, _, _, invstd = _normalize(x, feature_axes, eps)
    cache = dict(xhat=xhat, invstd=invstd, gamma=gamma, beta=beta, feature_axes=feature_axes)
    return _affine(xhat, gamma, beta), cache


def layernorm_backward(dout, cache):
    """Backward of `layernorm_forward`: batch norm's closed form, sums over one example's features.

        dl/dxhat = dl/dy * gamma
        dl/dx    = invstd/H * (H * dl/dxhat - sum dl/dxhat - xhat * sum(dl/dxhat * xhat))
        dl/dgamma = sum over examples of dl/dy * xhat,  dl/dbeta = sum over examples of dl/dy

    Args:
        dout: upstream gradient, x's shape.
        cache: from `layernorm_forward`.

    Returns:
        (dx, dgamma, dbeta): dx of x's shape; dgamma, dbeta of gamma's shape, or None when
        gamma / beta were None.
    """
    dout = _f64(dout)
    gamma, xhat, feature_axes = cache["gamma"], cache["xhat"], cache["feature_axes"]
    dxhat = dout if gamma is None else dout * gamma
    dx = _dx_closed_form(dxhat, xhat, cache["invstd"], feature_axes)
    example_axes = tuple(range(dout.ndim - len(feature_axes)))
    return (dx,) + _affine_grads(dout, xhat, gamma, cache["beta"], example_axes)


def numeric_gradient(f, x, dout, h=1e-5):
    """Central-difference gradient of sum(f(x) * dout) with respect to x (cs231n's
    eval_numerical_gradient_array).

        grad[i] = sum((f(x + h e_i) - f(x - h e_i)) * dout) / (2h)

    Args:
        f: function of x returning an array shaped like dout.
        x: float64 array; perturbed in place one entry at a time and restored.
        dout: upstream gradient weighting the outputs of f.
        h: step size.

    Returns:
        Array shaped like x.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.float64):
        # Perturbing in place only works on the caller's array, and h=1e-5 needs float64 resolution.
        raise TypeError("numeric_gradient needs x to be a float64 numpy array")
    dout = _f64(dout)
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        pos = np.array(f(x), dtype=np.float64)  # copy: f may return a view of x
        x[ix] = old - h
        neg = np.array(f(x), dtype=np.float64)
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * dout) / (2 * h)
    return grad


def rel_error(a, b):
    """Largest elementwise relative error, as in cs231n: max |a - b| / max(1e-8, |a| + |b|)."""
    a, b = _f64(a), _f64(b)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))
