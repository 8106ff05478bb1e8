"""How close to the truth a batch norm computed in finite precision must be, derived once, here.

Every low-precision comparison of a reduction (mean, variance, dweight, dbias, dx, running
statistics, and outputs built from them) checks each implementation, bnlab's and torch.nn's alike,
against a float64 truth computed from the *same* input values, with the elementwise bound
:func:`batch_norm_bounds` derives below. Two float32 results are never compared with each other:
their difference depends on the summation order, which depends on the CPU's vector width and the
thread split, and a flat ``atol`` that one machine's orders satisfy another's may miss.

Derivation (first order in the unit roundoff u, Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., sections 2-4):

* u = 2^-p for a p-bit significand: float64 2^-53, float32 2^-24. Half types are computed in
  float32 (bnlab and torch.nn's float32 side alike) and rounded once at the end (u_out: bfloat16
  2^-8, float16 2^-11). The float64 truth has errors of its own; they are covered by computing the
  bound with u + 2^-53.
* **Sums.** Any summation of m terms, in any order (recursive, pairwise, blocked, across SIMD lanes
  or threads: each is a binary tree of m - 1 additions, and each term passes through at most m - 1
  of them) has |error| <= g(m - 1) * sum |t_i|, g(k) = k u / (1 - k u) (Higham 4.2-4.3). This is
  the only bound that holds whatever the vector width; a product term adds one rounding, a division
  by m another, so the sums below use g(m + 2) or g(m + 3).
* **Shifted sums.** Kernels may sum x - k (k near the mean) or fold the output into x * a + c; every
  such form has terms no larger than |x| + |mu|, hence the factor 2 and A_i = s (|x_i| + |mu|) below
  (A_i >= |xhat_i|, the size of the normalized value as any of those forms sees it).

Per channel, with m values, mu, v the (biased) batch statistics, s = 1 / sqrt(v + eps):

  E_mu   = 2 g(m+2) mean|x|                           (sum, then / m)
  E_v    = 2 g(m+3) (mean x^2 + mu^2) + 2 |mu| E_mu     (covers one-pass E[x^2] - mu^2 and two-pass)
  E_s/s  = E_v / (2 (v + eps)) + 3u                    (d sqrt(t) / sqrt(t) = dt / 2t; sqrt, div)
  E_xhat = E_mu s + |xhat| E_s/s + 2u A                (subtract, multiply)
  E_z    = |w| E_xhat + 3u (|w| A + |b|)               (w xhat + b, or x a + (b - mu a))
  E_y    = L E_z + 4u |y| + E_eval_y                   (activation with Lipschitz constant L;
                                                        elu + 2u alpha: exp(z) - 1 without expm1)
  E_dz   = |dy| sum_k J_k [|z - z_k| <= E_z] + |dy| |act''| E_z + 2u |dz| + E_eval_dz
                                                       (a kink at z_k with jump J_k may flip)
  E_db   = g(m+1) sum|dz| + sum E_dz
  E_dw   = g(m+2) sum |dz| A + sum |dz| E_xhat + sum E_dz (|xhat| + E_xhat)
  E_dx   = |w| s [E_dz + E_db/m + A E_dw/m + E_xhat |dw|/m + 4u (|dz| + |db|/m + A |dw|/m)]
           + |dx| (E_s/s + 2u)                         (training; eval: |w| s (E_dz + 2u|dz|) + ...)
  E_running_mean = f E_mu + 3u_buf (|running_mean| + |mu|)
  E_running_var  = f E_v m/(m-1) + 4u_buf (|running_var| + |v| m/(m-1))

(E_eval: the cancellations inside silu, gelu, gelu_tanh and hardswish and their derivatives, see
:func:`_evaluation_errors`; f the momentum, or 1 / (num_batches_tracked + 1); u_buf the buffer's own
roundoff, where the update runs). In eval with running statistics, E_mu = E_v = 0. The in-place mode
(InPlaceABN) recovers z from the stored y by inverting the activation, which divides y's error by
act'(z): its backward uses E_xhat_rec = (E_y + u_out |y|) / (act'(z) |w|) + E_xhat, and elu's
act'(z) = y + alpha carries y's error E_y + u_out |y| into E_dz. Finally the result is rounded to
its own dtype: + u_out |truth|, and the whole error by (1 + u_out).

For m = 200 float32 values these allow ~1e-5 of sum |terms|: the AVX2 / AVX-512 difference of a
correct kernel (2e-5 relative on a dweight, i.e. ~1e-6 of its sum |terms|) is far inside, while
any error of the formula (unbiased instead of biased variance, a missing term, a half-precision
accumulation) is orders of magnitude outside (tests/test_tolerances.py checks both).

float64-only comparisons (logic checked in float64, the float64 reference against an
implementation) keep a flat 1e-10: m u_64 sum|terms| / |result| stays below 1e-11 for every m <=
1e5 and well-conditioned data used in those tests.
"""

from __future__ import annotations

import numpy as np
import torch

ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
# float64 flat tolerances: see the last paragraph of the module docstring
FLOAT64 = (1e-10, 1e-10)
FORWARD = {torch.float64: FLOAT64}
GRADIENT = {torch.float64: FLOAT64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision arithmetic runs in: half types are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def assert_close(actual, expected, dtype, table=FORWARD, msg=None):
    """Flat tolerance comparison, float64 only (the flat bounds are derived for float64 alone)."""
    if dtype not in table:
        raise AssertionError(
            f"no flat tolerance for {dtype}: compare with a float64 truth and "
            "batch_norm_bounds (or assert_within) instead"
        )
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg, check_dtype=True)


def run(module, x, grad_out):
    """(output, dx, [dweight, dbias]) of one forward + backward of ``module`` on a copy of x."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = module(x)
    out.backward(grad_out)
    grads = [p.grad.clone() for p in (module.weight, module.bias) if p is not None]
    module.zero_grad()
    return out, x.grad, grads


def to_numpy(t):
    """A float64 NumPy copy (never a view of a buffer that later steps update)."""
    return None if t is None else t.detach().double().numpy().copy()


# ---------------------------------------------------------------------------------------------
# the float64 truth of one batch-norm (+ activation) step, and its error bounds


def _hardsigmoid(z):
    """(z + 3) / 6 inside (-3, 3): autograd gives exactly 1/6 there and 0 at and outside the kinks
    (torch's convention), where torch's float64 hardsigmoid backward multiplies by 1/6 rounded to
    float32."""
    return torch.where(z <= -3, 0.0, torch.where(z >= 3, 1.0, (z + 3) / 6))


def _gelu_tanh(z):
    return z * (1 + torch.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))) / 2


# the truth's activations: torch's for the piecewise-linear ones and elu, the closed forms for the
# others (whose float64 autograd gives the exact derivatives and, for hardswish = z hardsigmoid(z),
# torch's branches at the kinks: 0 at z = -3, 1 at z = 3)
ACTIVATIONS = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: torch.nn.functional.relu(z),
    "leaky_relu": lambda z, p: torch.nn.functional.leaky_relu(z, p),
    "elu": lambda z, p: torch.nn.functional.elu(z, p),
    "silu": lambda z, p: z * torch.sigmoid(z),
    "hardswish": lambda z, p: z * _hardsigmoid(z),
    "hardsigmoid": lambda z, p: _hardsigmoid(z),
    "gelu": lambda z, p: z * (1 + torch.erf(z / np.sqrt(2))) / 2,
    "gelu_tanh": lambda z, p: _gelu_tanh(z),
}


def batch_norm_truth(
    x,
    dy,
    weight,
    bias,
    running_mean,
    running_var,
    *,
    training,
    momentum,
    eps,
    num_batches_tracked=None,
    activation="identity",
    param=0.0,
    inplace=False,
):
    """One step of act(batch_norm(x)) in float64 torch on the given values (any dtype, converted
    exactly). ``training`` is F.batch_norm's (batch statistics); the running statistics are updated
    when it is set and they are given. ``inplace``: InPlaceABN's weight |w| + eps.

    Returns a dict of float64 tensors: out, z (pre-activation), dx, dweight, dbias, running_mean,
    running_var, the batch's mean and (biased) var in training, and num_batches_tracked (an int,
    or None).
    """

    def f64(t):
        return None if t is None else t.detach().to(torch.float64).clone()

    x64 = f64(x).requires_grad_()
    w64 = f64(weight).requires_grad_() if weight is not None else None
    b64 = f64(bias).requires_grad_() if bias is not None else None
    rm, rv = f64(running_mean), f64(running_var)
    nbt = None if num_batches_tracked is None else int(num_batches_tracked)
    update = training and rm is not None
    factor = 0.0
    if update:
        factor = momentum if momentum is not None else 1.0 / (nbt + 1)
        nbt = nbt + 1 if nbt is not None else None
    gamma = w64.abs() + eps if (inplace and w64 is not None) else w64
    z = torch.nn.functional.batch_norm(x64, rm, rv, gamma, b64, training, factor, eps)
    out = ACTIVATIONS[activation](z, param)
    out.backward(f64(dy))
    dims = [d for d in range(x64.dim()) if d != 1]
    mean = x64.detach().mean(dims) if training else None
    var = x64.detach().var(dims, unbiased=False) if training else None
    return dict(
        out=out.detach(),
        z=z.detach(),
        dx=x64.grad,
        mean=mean,
        var=var,
        dweight=None if w64 is None else w64.grad,
        dbias=None if b64 is None else b64.grad,
        running_mean=rm,
        running_var=rv,
        num_batches_tracked=nbt,
    )


def _g(k, u):
    """gamma_k = k u / (1 - k u): the relative error bound of a k-step sum (Higham 3.4)."""
    return k * u / (1.0 - k * u)


def _rows(t: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (m, C)."""
    return np.moveaxis(t, 1, -1).reshape(-1, t.shape[1])


def _unrows(rows: np.ndarray, shape) -> np.ndarray:
    moved = (shape[0], *shape[2:], shape[1])
    return np.moveaxis(rows.reshape(moved), -1, 1)


def _activation_terms(z, activation, param):
    """(L, kinks, curvature, slope): Lipschitz constant, the kinks as (position, jump of the
    derivative) pairs, |act''(z)|, act'(z)."""
    neg = z < 0
    if activation == "identity":
        return 1.0, [], np.zeros_like(z), np.ones_like(z)
    if activation in ("relu", "leaky_relu"):
        slope = 0.0 if activation == "relu" else param
        kinks = [(0.0, abs(1.0 - slope))]
        return max(1.0, abs(slope)), kinks, np.zeros_like(z), np.where(neg, slope, 1.0)
    if activation == "elu":
        e = param * np.exp(np.minimum(z, 0.0))
        kinks = [(0.0, abs(1.0 - param))]
        return max(1.0, param), kinks, np.where(neg, e, 0.0), np.where(neg, e, 1.0)
    if activation in ("hardswish", "hardsigmoid"):
        inside = np.abs(z) < 3
        if activation == "hardsigmoid":
            return (
                1 / 6,
                [(-3.0, 1 / 6), (3.0, 1 / 6)],
                np.zeros_like(z),
                np.where(inside, 1 / 6, 0),
            )
        slope = np.where(z <= -3, 0.0, np.where(z < 3, z / 3 + 0.5, 1.0))
        return 1.5, [(-3.0, 0.5), (3.0, 0.5)], np.where(inside, 1 / 3, 0.0), slope
    slope, curvature = _smooth_derivatives(z, activation)
    return _SMOOTH_LIPSCHITZ[activation], [], curvature, slope


# max |act'| of the smooth ones, which have no kinks (silu 1.0998 at z = 2.40, gelu 1.1289 at
# z = sqrt(2), gelu_tanh 1.1295 near 1.42)
_SMOOTH_LIPSCHITZ = {"silu": 1.1, "gelu": 1.129, "gelu_tanh": 1.13}


def _smooth_derivatives(z, activation):
    """(act'(z), |act''(z)|) of silu, gelu and gelu_tanh, from their closed forms."""
    if activation == "silu":
        s = 1 / (1 + np.exp(-z))
        return s * (1 + z * (1 - s)), np.abs(s * (1 - s) * (2 + z * (1 - 2 * s)))
    if activation == "gelu":
        cdf = 0.5 * (1 + _erf(z / np.sqrt(2)))
        pdf = np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
        return cdf + z * pdf, np.abs(pdf * (2 - z * z))
    beta, kappa = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(beta * (z + kappa * z**3))
    du = beta * (1 + 3 * kappa * z * z)  # u'(z), u = beta (z + kappa z^3)
    sech2 = 1 - t * t
    curvature = sech2 * du - z * t * sech2 * du * du + 3 * beta * kappa * z * z * sech2
    return 0.5 * (1 + t) + 0.5 * z * sech2 * du, np.abs(curvature)


def _erf(x):
    return torch.special.erf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _evaluation_errors(z, dy, activation, u):
    """(E_eval_y, E_eval_dz): what evaluating act and act' adds beyond one rounding per operation
    of a first-order analysis: exp, erf and tanh within 2u of their result; 1 + erf(.) and
    1 + tanh(.) (gelu) and 1 + z (1 - s) (silu') cancel to absolute errors of ~3u |z|; gelu_tanh's
    derivative carries the error of 1 - t^2 times |z| u'(z); hardswish's z / 3 + 1/2 cancels near
    z = -3/2. Zero for the piecewise-linear activations and elu (covered by the 4u |y| and 2u |dz|
    terms and the elu term in batch_norm_bounds)."""
    az, ady = np.abs(z), np.abs(dy)
    if activation == "silu":
        return 4 * u * np.abs(z / (1 + np.exp(-z))), 6 * u * ady * (1 + az)
    if activation == "gelu":
        return 4 * u * az, 6 * u * ady * (1 + az)
    if activation == "gelu_tanh":
        du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * z * z)
        return 4 * u * az, 6 * u * ady * (1 + az * du)
    if activation == "hardswish":
        return np.zeros_like(z), 2 * u * ady * (1 + az)
    return np.zeros_like(z), np.zeros_like(z)


def batch_norm_bounds(
    x,
    dy,
    weight,
    bias,
    running_mean,
    running_var,
    *,
    training,
    momentum,
    eps,
    dtype,
    num_batches_tracked=None,
    activation="identity",
    param=0.0,
    inplace=False,
):
    """(truth, bounds): :func:`batch_norm_truth`'s result, and elementwise error bounds (float64
    tensors, same keys) for an implementation that computes in ``compute_dtype(dtype)``; see the
    module docstring for each line. The rounding of each result to its own dtype is added by
    :func:`assert_within`.
    """
    truth = batch_norm_truth(
        x,
        dy,
        weight,
        bias,
        running_mean,
        running_var,
        training=training,
        momentum=momentum,
        eps=eps,
        num_batches_tracked=num_batches_tracked,
        activation=activation,
        param=param,
        inplace=inplace,
    )
    u = ROUNDOFF[compute_dtype(dtype)] + ROUNDOFF[torch.float64]
    u_out = ROUNDOFF[dtype]
    shape = tuple(x.shape)
    X, DY = _rows(to_numpy(x)), _rows(to_numpy(dy))
    m, c = X.shape
    w = np.ones(c) if weight is None else np.abs(to_numpy(weight)) + (eps if inplace else 0.0)
    b = np.zeros(c) if bias is None else np.abs(to_numpy(bias))
    if training:
        mu, v = X.mean(0), X.var(0)
        e_mu = 2 * _g(m + 2, u) * np.abs(X).mean(0)
        e_v = 2 * _g(m + 3, u) * ((X * X).mean(0) + mu * mu) + 2 * np.abs(mu) * e_mu
    else:
        mu, v = to_numpy(running_mean), to_numpy(running_var)
        e_mu = e_v = np.zeros(c)
    s = 1.0 / np.sqrt(v + eps)
    rel_s = e_v / (2 * (v + eps)) + 3 * u
    xhat = (X - mu) * s
    A = s * (np.abs(X) + np.abs(mu))
    e_xhat = e_mu * s + np.abs(xhat) * rel_s + 2 * u * A
    Z = _rows(truth["z"].numpy())
    e_z = w * e_xhat + 3 * u * (w * A + b)
    lip, kinks, curvature, slope = _activation_terms(Z, activation, param)
    eval_y, eval_dz = _evaluation_errors(Z, DY, activation, u)
    Y = _rows(truth["out"].numpy())
    e_y = lip * e_z + 4 * u * np.abs(Y) + eval_y
    if activation == "elu":  # alpha (exp(z) - 1), without expm1, is accurate to 2u alpha absolute
        e_y = e_y + np.where(Z < 0, 2 * u * param, 0.0)
    dZ = DY * slope
    flips = sum((jump * (np.abs(Z - at) <= e_z) for at, jump in kinks), np.zeros_like(Z))
    e_dz = np.abs(DY) * (flips + curvature * e_z) + 2 * u * np.abs(dZ) + eval_dz
    if inplace:  # the backward recovers z (and elu's act'(z) = y + alpha) from the stored y
        e_stored = e_y + u_out * np.abs(Y)
        e_xhat = e_xhat + e_stored / (slope * w)
        e_dz = e_dz + np.abs(DY) * np.where(curvature > 0, e_stored, 0.0)
    e_db = _g(m + 1, u) * np.abs(dZ).sum(0) + e_dz.sum(0)
    e_dw = (
        _g(m + 2, u) * (np.abs(dZ) * A).sum(0)
        + (np.abs(dZ) * e_xhat).sum(0)
        + (e_dz * (np.abs(xhat) + e_xhat)).sum(0)
    )
    DX = np.abs(_rows(truth["dx"].numpy()))
    if training:
        db, dw = np.abs(dZ.sum(0)), np.abs((dZ * xhat).sum(0))
        e_dx = w * s * (
            e_dz
            + e_db / m
            + A * e_dw / m
            + e_xhat * dw / m
            + 4 * u * (np.abs(dZ) + db / m + A * dw / m)
        ) + DX * (rel_s + 2 * u)
    else:
        e_dx = w * s * (e_dz + 2 * u * np.abs(dZ)) + DX * (rel_s + 2 * u)
    bounds = dict(out=e_y, dx=e_dx, dweight=e_dw, dbias=e_db, mean=e_mu, var=e_v)
    bounds = {
        k: torch.from_numpy(_unrows(v, shape) if v.ndim == 2 else v) for k, v in bounds.items()
    }
    if training and running_mean is not None:
        f = momentum if momentum is not None else 1.0 / (int(num_batches_tracked) + 1)
        u_buf = max(u, ROUNDOFF[running_mean.dtype])
        unbiased = m / (m - 1)
        rm, rv = np.abs(to_numpy(running_mean)), np.abs(to_numpy(running_var))
        bounds["running_mean"] = torch.from_numpy(f * e_mu + 3 * u_buf * (rm + np.abs(mu)))
        bounds["running_var"] = torch.from_numpy(
            f * e_v * unbiased + 4 * u_buf * (rv + v * unbiased)
        )
    return truth, bounds


def assert_within(actual, truth, bound, name="result", truncated=False):
    """|actual - truth| <= bound elementwise, after the rounding of the result to its own dtype:
    bound * (1 + u_out) + u_out |truth|. ``truncated``: the last conversion truncates instead of
    rounding to nearest (Triton's CPU interpreter converts float32 to bfloat16 so), which doubles
    u_out. The message names the worst element and its ratio."""
    assert actual.shape == truth.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    )
    u_out = ROUNDOFF[actual.dtype] * (2 if truncated and actual.dtype != truth.dtype else 1)
    got = actual.detach().to(torch.float64)
    limit = bound * (1 + u_out) + u_out * truth.abs()
    err = (got - truth).abs()
    bad = ~(err <= limit)  # NaN fails
    if bad.any():
        ratio = torch.where(limit > 0, err / limit, torch.full_like(err, float("inf")))
        ratio = torch.where(err.isnan(), torch.full_like(err, float("inf")), ratio)
        i = int(ratio.flatten().argmax())
        idx = np.unravel_index(i, tuple(truth.shape)) if truth.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {truth.numel()} values outside the derived bound; "
            "worst at "
            f"{tuple(int(j) for j in idx)}: got {got.flatten()[i].item():.9g}, truth "
            f"{truth.flatten()[i].item():.9g}, |error| {err.flatten()[i].item():.3g} > bound "
            f"{limit.flatten()[i].item():.3g} ({ratio.flatten()[i].item():.3g}x)"
        )


def assert_step_within(results: dict, truth: dict, bounds: dict, label="", truncated=False):
    """Each result of a step (out, dx, dweight, dbias, running statistics, num_batches_tracked)
    within its bound of the truth; keys missing from ``results`` are not checked. A result the
    truth does not have (or the reverse: a missing gradient) is an error."""
    for key, value in results.items():
        expected = truth.get(key)
        assert (value is None) == (expected is None), (
            f"{label}{key}: {'no' if value is None else 'a'} result, "
            f"{'a' if value is None else 'no'} truth"
        )
        if value is None:
            continue
        if key == "num_batches_tracked":
            assert int(value) == truth[key], (
                f"{label}num_batches_tracked {int(value)} != {truth[key]}"
            )
            continue
        assert_within(value, truth[key], bounds[key], f"{label}{key}", truncated)


def check_module_step(module, x, grad_out, dtype=None, label=""):
    """One training or eval forward + backward of a batch-norm module (bnlab's or torch.nn's) on x,
    every result within its derived bound of the float64 truth computed from the module's state
    before the step. ``dtype``: the precision the module computes in (default x's, with half
    types computed in float32); the results' own dtypes set their final rounding."""
    state_keys = ("running_mean", "running_var", "num_batches_tracked")
    tracked = module.running_mean is not None
    use_batch = module.training or not tracked
    before = {
        k: None if getattr(module, k) is None else getattr(module, k).clone() for k in state_keys
    }
    truth, bounds = batch_norm_bounds(
        x,
        grad_out,
        module.weight,
        module.bias,
        before["running_mean"],
        before["running_var"],
        training=use_batch,
        momentum=module.momentum,
        eps=module.eps,
        dtype=dtype or x.dtype,
        num_batches_tracked=before["num_batches_tracked"],
    )
    out, dx, dparams = run(module, x, grad_out)
    results = dict(
        out=out,
        dx=dx,
        dweight=dparams[0] if module.weight is not None else None,
        dbias=dparams[-1] if module.bias is not None else None,
    )
    if tracked and use_batch:
        results.update({k: getattr(module, k) for k in state_keys})
    elif tracked:  # eval: not updated, unchanged bit for bit
        for key in state_keys:
            assert torch.equal(getattr(module, key), before[key]), f"{label}{key} changed"
    assert_step_within(results, truth, bounds, label, truncated=_truncates(module))
    return out, dx, dparams


def _truncates(module) -> bool:
    """Triton's CPU interpreter (no GPU here) truncates float32 to bfloat16; a GPU rounds."""
    return getattr(module, "backend", None) == "gpu" and not torch.cuda.is_available()


def layer_norm_bounds(x, dy, weight, bias, normalized_ndim, *, eps, dtype):
    """(truth, bounds) for layer norm over the last ``normalized_ndim`` dims, keyed out, dx,
    dweight, dbias. Layer norm is batch norm of the transposed (features, examples) matrix without
    affine, fed the upstream gradient w * dy; the affine is then elementwise and its gradients are
    sums over the B examples, bounded as dweight and dbias above (with E_xhat from that batch
    norm)."""
    norm_shape = tuple(x.shape[x.dim() - normalized_ndim :])
    feats = int(np.prod(norm_shape))
    x64 = x.detach().to(torch.float64).reshape(-1, feats)
    dy64 = dy.detach().to(torch.float64).reshape(-1, feats)
    w = (
        torch.ones(feats, dtype=torch.float64)
        if weight is None
        else weight.detach().double().reshape(-1)
    )
    b = (
        torch.zeros(feats, dtype=torch.float64)
        if bias is None
        else bias.detach().double().reshape(-1)
    )
    # as batch norm: "channels" are the examples, "values per channel" the features
    truth_t, bounds_t = batch_norm_bounds(
        x64.t(),
        (dy64 * w).t(),
        None,
        None,
        None,
        None,
        training=True,
        momentum=None,
        eps=eps,
        dtype=dtype,
    )
    xhat = truth_t["out"].t()
    e_xhat = bounds_t["out"].t()
    u = ROUNDOFF[compute_dtype(dtype)] + ROUNDOFF[torch.float64]
    n = x64.shape[0]
    e_dx = bounds_t["dx"].t() + 2 * u * (dy64 * w).abs().sum(1, keepdim=True)  # w * dy rounded
    shape = tuple(x.shape)
    truth = dict(
        out=(xhat * w + b).reshape(shape),
        dx=truth_t["dx"].t().reshape(shape),
        dweight=None if weight is None else (dy64 * xhat).sum(0).reshape(norm_shape),
        dbias=None if bias is None else dy64.sum(0).reshape(norm_shape),
    )
    bounds = dict(
        out=(w.abs() * e_xhat + 3 * u * (w.abs() * xhat.abs() + b.abs())).reshape(shape),
        dx=e_dx.reshape(shape),
        dweight=(
            _g(n + 2, u) * (dy64.abs() * (xhat.abs() + e_xhat)).sum(0)
            + (dy64.abs() * e_xhat).sum(0)
        ).reshape(norm_shape),
        dbias=(_g(n + 1, u) * dy64.abs().sum(0)).reshape(norm_shape),
    )
    return truth, bounds


def assert_rounded_once(actual, expected, name="result"):
    """A half-precision result against the same computation in float32 (or wider), rounded once:
    |actual - expected| <= u_half |expected| (the rounding) + |float32 error of either side| <=
    2 u_half |expected|, since the float32 error, g(m + 3) times a condition number near 1 for
    the well-scaled data of these tests, stays below u_half = 2^-8 (bfloat16) for m < 6e4."""
    u_half = ROUNDOFF[actual.dtype]
    expected = expected.detach().to(torch.float64)
    assert_within(actual, expected, u_half * expected.abs(), name)


def assert_statistics_within(mean, var, x, label=""):
    """A kernel's batch mean and biased variance of x within E_mu and E_v of the float64 truth."""
    zero = torch.zeros_like(x)
    truth, bounds = batch_norm_bounds(
        x.cpu(),
        zero.cpu(),
        None,
        None,
        None,
        None,
        training=True,
        momentum=None,
        eps=1e-5,
        dtype=x.dtype,
    )
    for name, value in (("mean", mean), ("var", var)):
        value = torch.as_tensor(value).cpu()
        assert_within(value, truth[name], bounds[name], f"{label}{name}")
