"""Numba CPU backend: batch norm (+ activation) in the fewest passes over memory.

Every input is seen as one of two 2- or 3-D arrays without copying:

- ``NCS`` (N, C, S), S = prod(spatial): contiguous inputs of rank >= 3; each (n, c) row is S
  contiguous values;
- ``RC`` (R, C), R = N * S: (N, C) inputs and channels_last / channels_last_3d ones; each row holds
  one value of every channel.

Work is split over channels *and* the batch (NCS: tasks of (n, c, block of S); RC: blocks of rows),
so a 3-channel image batch still keeps every core busy. Each task writes its own partial sums, which
are added per channel afterwards: no atomics, and the result does not depend on the thread count's
scheduling.

Passes over memory (m = values per channel):

- training forward: one read of x for the statistics, one read of x and one write of y;
- backward: one read of (x, dy) for the two sums, one read of (x, dy) and one write of dx;
- eval forward: one read, one write.

With enough channels for the threads, NCS training passes run by channel instead: a task takes
a few whole channels through both passes, whose second read finds them in the core's cache
(_ncs_forward_by_channel, _ncs_backward_by_channel): x (and dy) come from memory once. So does
a residual unit's, act(batch_norm(x) + r): the forward adds r in its second pass, and the backward
(_ncs_unit_backward_by_channel) writes dz = dy act'(y), the residual's gradient, in its first and
reads it back from the cache in its second (x, y, dy read once; dz, dx written).

Statistics are sums around a per-channel shift (the channel's first value):
``mean = k + sum(x - k) / m``, ``var = (sum((x - k)^2) - sum(x - k)^2 / m) / m``, summed in the
input's dtype over spans of up to 1024 values (or 32 rows) and in float64 across spans. With the
shift inside the data's range the cancellation is that of the data's own spread, so float32 input
at 1e4 + N(0, 1) keeps ~1e-7 relative variance error, where the naive E[x^2] - E[x]^2 in float32
loses everything.

Loops run in the input's dtype (float32 SIMD is twice as wide as float64, and float64 arithmetic
made the float32 kernels compute-bound). Elementwise work sees x - k with k the channel's mean
rounded to that dtype (exact for x near the mean, by Sterbenz's lemma); the float64 rest k - mean
is folded into the per-channel terms, so a large mean costs no accuracy: y = (x - k) * a + b'.

Fused activations (identity, relu, leaky_relu, elu, silu, hardswish, hardsigmoid, gelu, gelu_tanh;
see :func:`activation_code`) apply after the affine transform, in the same passes: the training
forward still reads x twice and writes y once. The backward keeps nothing but x: both of its passes
recompute the pre-activation z = (x - mean) * a + b (a = weight * invstd, b = bias) at each position
to get dz = dy * act'(z), so each reads (x, dy) and the second writes dx, as without an activation.
In the in-place mode it reads y instead and inverts the activation (identity, leaky_relu and elu
only, the invertible ones). Kernels are compiled on first use and cached on disk.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .composite import (
    activated,
    activated_backward,
    dense_format,
    is_channels_last,
    is_dense,
    laid_out_like,
)
from .contract import UNMASKED_BATCH_NORM_OPS, plain_from_fused

_DTYPES = (torch.float32, torch.float64)
_OPS = UNMASKED_BATCH_NORM_OPS
# reassociation lets LLVM vectorize the reductions; no "nnan"/"ninf": NaN must still poison the
# statistics so the running-statistics guard sees it.
_FAST = {"reassoc", "contract", "arcp"}
_JIT = dict(cache=True, fastmath=_FAST, nogil=True)
_TASKS_PER_THREAD = 8  # finer tasks balance uneven rows; partial sums stay tiny
_CHANNELS_PER_THREAD = 4  # NCS kernels by channel: at least this many tasks a thread
_GROUP_VALUES = 2048  # and channels grouped into rows of about this many values,
_GROUP_BYTES = 1 << 16  # as far as a group's values (of one tensor) stay within this
_CHANNEL_BYTES = 1 << 18  # and only where one channel's values (x, and dy: twice) fit a core's L2


# Activation codes of the loops. identity, relu and leaky_relu are one piecewise-linear family,
# z > 0 ? z : p z, whose loops vectorize; every other activation has a code of its own and runs in
# the loops of _act / _act_grad (a loop-invariant branch per element: elu, silu and the gelus call
# exp, erf or tanh, which stop LLVM from vectorizing a loop anyway).
_LINEAR, _ELU, _SILU, _HARDSWISH, _HARDSIGMOID, _GELU, _GELU_TANH = range(7)
_CODES = {
    "elu": _ELU,
    "silu": _SILU,
    "hardswish": _HARDSWISH,
    "hardsigmoid": _HARDSIGMOID,
    "gelu": _GELU,
    "gelu_tanh": _GELU_TANH,
}
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_BETA = math.sqrt(2.0 / math.pi)  # gelu_tanh: tanh(beta (z + kappa z^3)), as torch's
_TANH_KAPPA = 0.044715


def activation_code(activation: str, param: float) -> tuple[int, float]:
    """(code, p): the piecewise-linear family z > 0 ? z : p z with p = 1 (identity), 0 (relu) or
    the slope (leaky_relu); otherwise the activation's own code, p its parameter (elu's alpha)."""
    if activation in _CODES:
        return _CODES[activation], float(param)
    return _LINEAR, {"identity": 1.0, "relu": 0.0}.get(activation, float(param))


# --------------------------------------------------------------------------------------------
# elementwise pieces, inlined. The piecewise-linear loops are kept apart from the others (the
# branch is taken per row): a call to exp anywhere in a loop body stops LLVM from vectorizing it.
# Constants are cast to z's type (type(z)(c)): a float64 literal would turn float32 loops into
# float64 ones. Definitions and the branches at the kinks are torch.nn.functional's (see
# bnlab.kernels.composite.activate and activation_grad).
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _linear_act(z, p):
    return z if z > 0.0 else z * p


@njit(inline="always", **_JIT)
def _relu6_over_6(z):
    """hardsigmoid(z) = min(max(z + 3, 0), 6) / 6, NaN kept (a comparison with NaN is False)."""
    t = z + type(z)(3.0)
    if t < 0.0:
        t = type(z)(0.0)
    if t > 6.0:
        t = type(z)(6.0)
    return t / type(z)(6.0)


@njit(inline="always", **_JIT)
def _act(z, code, p):
    """act(z) for every code but _LINEAR, in z's dtype."""
    one, half = type(z)(1.0), type(z)(0.5)
    if code == _ELU:
        return z if z > 0.0 else p * math.expm1(z)
    if code == _SILU:
        return z / (one + math.exp(-z))
    if code == _HARDSWISH:
        return z * _relu6_over_6(z)
    if code == _HARDSIGMOID:
        return _relu6_over_6(z)
    if code == _GELU:
        return half * z * (one + math.erf(z * type(z)(_SQRT1_2)))
    inner = type(z)(_TANH_BETA) * (z + type(z)(_TANH_KAPPA) * z * z * z)
    return half * z * (one + math.tanh(inner))


@njit(inline="always", **_JIT)
def _act_grad(z, g, code, p):
    """g act'(z) for every code but _LINEAR: elu' = p exp(z) for z <= 0; silu' = s (1 + z (1 - s)),
    s = sigmoid(z); hardswish' = 0 (z <= -3), z / 3 + 1/2 (-3 < z < 3), 1 (z >= 3); hardsigmoid' =
    1/6 on (-3, 3) only; gelu' = Phi(z) + z phi(z); gelu_tanh' = (1 + t) / 2 + z (1 - t^2) beta
    (1 + 3 kappa z^2) / 2, t = tanh(beta (z + kappa z^3))."""
    one, half, zero = type(z)(1.0), type(z)(0.5), type(z)(0.0)
    if code == _ELU:
        return g if z > 0.0 else g * p * math.exp(z)
    if code == _SILU:
        s = one / (one + math.exp(-z))
        return g * (s * (one + z * (one - s)))
    if code == _HARDSWISH:
        if z <= -3.0:
            return zero
        return g * (z / type(z)(3.0) + half) if z < 3.0 else g
    if code == _HARDSIGMOID:
        return g * type(z)(1.0 / 6.0) if -3.0 < z < 3.0 else zero
    if code == _GELU:
        cdf = half * (one + math.erf(z * type(z)(_SQRT1_2)))
        return g * (cdf + z * math.exp(-half * z * z) * type(z)(_INV_SQRT_2PI))
    beta, kappa = type(z)(_TANH_BETA), type(z)(_TANH_KAPPA)
    t = math.tanh(beta * (z + kappa * z * z * z))
    kappa3 = type(z)(3.0 * _TANH_KAPPA)
    return g * (half * (one + t) + half * z * (one - t * t) * beta * (one + kappa3 * z * z))


@njit(inline="always", **_JIT)
def _linear_grad(v, g, mean, a, b, p, from_output):
    """(dz, x - mean) at one position from the saved input v = x, or in place from the output v = y
    (then p > 0 and z = act^-1(y))."""
    if from_output:
        negative = v < 0.0
        z = v / p if negative else v
        return (g * p if negative else g), (z - b) / a
    centred = v - mean
    return (g if centred * a + b > 0.0 else g * p), centred


@njit(inline="always", **_JIT)
def _grad(v, g, mean, a, b, code, p, from_output):
    """:func:`_linear_grad` for every other code. From the output only for elu, the one invertible
    activation among them: y < 0 gives z = log1p(y / alpha) and dy/dz = y + alpha."""
    if from_output:
        if v >= 0.0:
            return g, (v - b) / a
        return g * (v + p), (math.log1p(v / p) - b) / a
    centred = v - mean
    return _act_grad(centred * a + b, g, code, p), centred


# --------------------------------------------------------------------------------------------
# NCS kernels: x[n, c, s]; task t = ((n * C) + c) * B + block. The input (x, or v: what the
# backward keeps) is read from channel c0 on: channels c0 .. c0 + C of a larger array, such as the
# concatenated features of batch_norm_concat_forward (C: the per-channel vectors' length).
# --------------------------------------------------------------------------------------------

_SPAN = 1024  # values summed in the input's dtype before they are added into float64


@njit(inline="always", **_JIT)
def _task(t, c_, s_, blocks):
    """(n, c, first, end) of task t: block ``t % blocks`` of row (n, c)."""
    row, blk = t // blocks, t % blocks
    size = (s_ + blocks - 1) // blocks
    return row // c_, row % c_, blk * size, min(s_, (blk + 1) * size)


@njit(inline="always", **_JIT)
def _shifted_sums(row, k):
    """(sum(row - k), sum((row - k)^2)): in row's dtype per span of _SPAN values, then float64."""
    s = 0.0
    q = 0.0
    for first in range(0, row.shape[0], _SPAN):
        span = row[first : first + _SPAN]  # (a slice: an index range here does not vectorize)
        cs = row.dtype.type(0)
        cq = row.dtype.type(0)
        for i in range(span.shape[0]):
            d = span[i] - k
            cs += d
            cq += d * d
        s += cs
        q += cq
    return s, q


@njit(inline="always", **_JIT)
def _apply_row(row, dst, mc, ac, bc, code, p):
    """dst = act((row - mc) * ac + bc)."""
    if code == _LINEAR:
        for i in range(row.shape[0]):
            dst[i] = _linear_act((row[i] - mc) * ac + bc, p)
    else:
        for i in range(row.shape[0]):
            dst[i] = _act((row[i] - mc) * ac + bc, code, p)


@njit(inline="always", **_JIT)
def _apply_add_row(row, res, dst, mc, ac, bc, p):
    """dst = act((row - mc) * ac + bc + res), act of the piecewise-linear family (slope p)."""
    for i in range(row.shape[0]):
        dst[i] = _linear_act((row[i] - mc) * ac + bc + res[i], p)


@njit(inline="always", **_JIT)
def _grad_sums_row(row, g, mc, ac, bc, code, p, from_output):
    """(sum(dz), sum(dz (x - mc))) over a row, as :func:`_shifted_sums` sums."""
    s = 0.0
    q = 0.0
    for first in range(0, row.shape[0], _SPAN):
        vs, gs = row[first : first + _SPAN], g[first : first + _SPAN]
        cs = row.dtype.type(0)
        cq = row.dtype.type(0)
        if code == _LINEAR:
            for i in range(vs.shape[0]):
                dz, xc = _linear_grad(vs[i], gs[i], mc, ac, bc, p, from_output)
                cs += dz
                cq += dz * xc
        else:
            for i in range(vs.shape[0]):
                dz, xc = _grad(vs[i], gs[i], mc, ac, bc, code, p, from_output)
                cs += dz
                cq += dz * xc
        s += cs
        q += cq
    return s, q


@njit(inline="always", **_JIT)
def _grad_input_row(row, g, dst, mc, ac, bc, k1c, k0c, code, p, from_output):
    """dst = ac dz + k1c (x - mc) + k0c."""
    if code == _LINEAR:
        for i in range(row.shape[0]):
            dz, xc = _linear_grad(row[i], g[i], mc, ac, bc, p, from_output)
            dst[i] = ac * dz + k1c * xc + k0c
    else:
        for i in range(row.shape[0]):
            dz, xc = _grad(row[i], g[i], mc, ac, bc, code, p, from_output)
            dst[i] = ac * dz + k1c * xc + k0c


@njit(parallel=True, **_JIT)
def _ncs_stats(x, c0, shift, blocks, out_sum, out_sq):
    n_, c_, s_ = x.shape[0], shift.shape[0], x.shape[2]
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        out_sum[t], out_sq[t] = _shifted_sums(x[n, c0 + c, lo:hi], shift[c])


@njit(parallel=True, **_JIT)
def _ncs_apply(x, c0, out, mean, a, b, code, p, blocks):
    n_, c_, s_ = out.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        _apply_row(x[n, c0 + c, lo:hi], out[n, c, lo:hi], mean[c], a[c], b[c], code, p)


@njit(parallel=True, **_JIT)
def _ncs_apply_add(x, r, out, mean, a, b, p, blocks):
    """y = act(z + r), act of the piecewise-linear family (slope p), r laid out as x."""
    n_, c_, s_ = x.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        _apply_add_row(x[n, c, lo:hi], r[n, c, lo:hi], out[n, c, lo:hi], mean[c], a[c], b[c], p)


@njit(parallel=True, **_JIT)
def _ncs_grad_sums(v, c0, dy, mean, a, b, code, p, from_output, blocks, out_dz, out_dzx):
    n_, c_, s_ = dy.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        row, g = v[n, c0 + c, lo:hi], dy[n, c, lo:hi]
        out_dz[t], out_dzx[t] = _grad_sums_row(row, g, mean[c], a[c], b[c], code, p, from_output)


@njit(parallel=True, **_JIT)
def _ncs_grad_input(v, c0, dy, dx, mean, a, b, k1, k0, code, p, from_output, blocks):
    n_, c_, s_ = dx.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        row, g, dst = v[n, c0 + c, lo:hi], dy[n, c, lo:hi], dx[n, c, lo:hi]
        _grad_input_row(row, g, dst, mean[c], a[c], b[c], k1[c], k0[c], code, p, from_output)


# NCS kernels by channel: a task takes a group of consecutive channels (one, or as many as make
# rows of ~_GROUP_VALUES values: x[n, c:c + g] is contiguous) through both passes. The second pass
# finds the group's values (N * g * S of x, and of dy in the backward: a few hundred KB at most)
# still in the core's cache, so each tensor comes from memory once: a training forward reads x
# once and writes y (2 tensor-sized transfers, not 3), a backward reads x and dy once and writes dx
# (3, not 5). The per-channel terms between the passes are computed here, in float64, by the
# formulas the two-kernel path evaluates in NumPy (_act_forward, _act_backward). Each channel's
# sums run over its rows in order, whatever the thread count.


@njit(inline="always", **_JIT)
def _group(t, group, c_):
    """Channels lo .. hi of task t."""
    return t * group, min(c_, (t + 1) * group)


@njit(inline="always", **_JIT)
def _param(vector, c, default):
    """A per-channel parameter as float64: ``default`` where the vector is empty (None given)."""
    return np.float64(vector[c]) if vector.shape[0] else default


@njit(parallel=True, **_JIT)
def _ncs_forward_by_channel(x, r, out, weight, bias, eps, code, p, group, out_mean, out_var, ab):
    """Training forward: out = act((x - mean) weight / sqrt(var + eps) + bias [+ r]) with the
    batch's mean and biased variance, written to out_mean, out_var (x's dtype; weight, bias:
    vectors, or empty for none; r: the residual laid out as x, added before an activation of the
    piecewise-linear family, or empty for none; scratch ab: (2, C) float64)."""
    n_, c_, s_ = x.shape
    count = n_ * s_
    dtype = x.dtype.type
    for t in prange((c_ + group - 1) // group):
        lo, hi = _group(t, group, c_)
        for c in range(lo, hi):
            ab[0, c] = 0.0
            ab[1, c] = 0.0
        for n in range(n_):
            for c in range(lo, hi):
                row_s, row_q = _shifted_sums(x[n, c], x[0, c, 0])  # shift: the first value
                ab[0, c] += row_s
                ab[1, c] += row_q
        for c in range(lo, hi):
            s, q = ab[0, c], ab[1, c]
            mean = np.float64(x[0, c, 0]) + s / count
            var = (q - s * s / count) / count
            if var < 0.0:  # (NaN stays NaN)
                var = 0.0
            out_mean[c] = mean  # the mean in x's dtype: mc below
            out_var[c] = var
            a = _param(weight, c, 1.0) / math.sqrt(var + eps)
            # y = (x - mc) * a + b', the rest mc - mean folded into b'
            ab[0, c] = a
            ab[1, c] = _param(bias, c, 0.0) + (np.float64(out_mean[c]) - mean) * a
        for n in range(n_):
            for c in range(lo, hi):
                ac, bc = dtype(ab[0, c]), dtype(ab[1, c])
                if r.shape[0]:
                    _apply_add_row(x[n, c], r[n, c], out[n, c], out_mean[c], ac, bc, p)
                else:
                    _apply_row(x[n, c], out[n, c], out_mean[c], ac, bc, code, p)


@njit(inline="always", **_JIT)
def _backward_terms(terms, c, mean, var, weight, bias, eps, dtype):
    """terms[:, c] = (a, b', invstd, rest, 0, 0): a = weight invstd, rest = mc - mean (mc the
    mean in the input's dtype), b' = bias + rest a, and the two sums zeroed."""
    m = np.float64(mean[c])
    invstd = 1.0 / math.sqrt(np.float64(var[c]) + eps)
    a = _param(weight, c, 1.0) * invstd
    rest = np.float64(dtype(m)) - m
    terms[0, c] = a
    terms[1, c] = _param(bias, c, 0.0) + rest * a
    terms[2, c] = invstd
    terms[3, c] = rest
    terms[4, c] = 0.0
    terms[5, c] = 0.0


@njit(inline="always", **_JIT)
def _backward_constants(terms, grads, c, count, training):
    """From the sums sum(dz), sum(dz (x - mc)) in terms[4:6, c]: grads[:, c] = (dbias, dweight),
    and terms[2:4, c] = (k1, k0) of dx = a dz + k1 (x - mc) + k0 (0 in eval)."""
    a, invstd, rest = terms[0, c], terms[2, c], terms[3, c]
    s = terms[4, c]
    q = terms[5, c] + rest * s  # sum(dz (x - mean)) from sum(dz (x - mc))
    grads[0, c] = s
    grads[1, c] = q * invstd
    k1 = -a * invstd * invstd * q / count if training else 0.0
    terms[2, c] = k1
    terms[3, c] = -a * s / count + k1 * rest if training else 0.0


@njit(parallel=True, **_JIT)
def _ncs_backward_by_channel(
    v, c0, dy, dx, mean, var, weight, bias, eps, code, p, from_output, training, group, grads,
    terms,
):  # fmt: skip
    """Both backward passes from the per-channel vectors (weight, bias: empty for none): z = (x -
    mc) a + b' (a = weight invstd, mc the mean in v's dtype, b' = bias + (mc - mean) a), the sums
    sum(dz) and sum(dz (x - mean)), then dx = a dz + k1 (x - mc) + k0, k1 = -a invstd^2
    sum(dz (x - mean)) / m and k0 = -a sum(dz) / m + k1 (mc - mean) in training (0 in eval); dx
    empty: not written. grads (2, C) gets (dbias, dweight) = (sum(dz), sum(dz (x - mean)) invstd)
    in its dtype; terms: (6, C) float64 scratch."""
    n_, c_, s_ = dy.shape
    count = n_ * s_
    dtype = v.dtype.type
    for t in prange((c_ + group - 1) // group):
        lo, hi = _group(t, group, c_)
        for c in range(lo, hi):
            _backward_terms(terms, c, mean, var, weight, bias, eps, dtype)
        for n in range(n_):
            for c in range(lo, hi):
                mc, ac, bc = dtype(mean[c]), dtype(terms[0, c]), dtype(terms[1, c])
                row_s, row_q = _grad_sums_row(
                    v[n, c0 + c], dy[n, c], mc, ac, bc, code, p, from_output
                )
                terms[4, c] += row_s
                terms[5, c] += row_q
        for c in range(lo, hi):
            _backward_constants(terms, grads, c, count, training)
        if dx.shape[0] == 0:
            continue
        for n in range(n_):
            for c in range(lo, hi):
                mc, ac, bc = dtype(mean[c]), dtype(terms[0, c]), dtype(terms[1, c])
                k1c, k0c = dtype(terms[2, c]), dtype(terms[3, c])
                row, g, dst = v[n, c0 + c], dy[n, c], dx[n, c]
                _grad_input_row(row, g, dst, mc, ac, bc, k1c, k0c, code, p, from_output)


@njit(inline="always", **_JIT)
def _unit_grad_sums_row(row, out, g, dst, mc, p):
    """dst = dz = g act'(out) of a residual unit's output (slope p where out <= 0; relu's p = 0
    gives 0 there, as ATen's threshold_backward), and (sum(dz), sum(dz (row - mc))) summed as
    :func:`_shifted_sums`."""
    s = 0.0
    q = 0.0
    zero = row.dtype.type(0)
    for first in range(0, row.shape[0], _SPAN):
        end = first + _SPAN
        vs, ys, gs, ds = row[first:end], out[first:end], g[first:end], dst[first:end]
        cs = zero
        cq = zero
        for i in range(vs.shape[0]):
            dz = gs[i] if ys[i] > 0.0 else (gs[i] * p if p != 0.0 else zero)
            ds[i] = dz
            cs += dz
            cq += dz * (vs[i] - mc)
        s += cs
        q += cq
    return s, q


@njit(parallel=True, **_JIT)
def _ncs_unit_backward_by_channel(
    v, y, dy, dz, dx, mean, var, weight, bias, eps, p, training, group, grads, terms
):
    """Both backward passes of the residual unit y = act(batch_norm(x) + r), act of the
    piecewise-linear family with a kink (slope p: relu's 0, leaky_relu's): dz = dy act'(y), the
    residual's gradient, written with its sums, then dx = a dz + k1 (x - mc) + k0 as
    :func:`_ncs_backward_by_channel` (dz read back from the core's cache; dx empty: not
    written). x, y and dy are read once."""
    n_, c_, s_ = dy.shape
    count = n_ * s_
    dtype = v.dtype.type
    for t in prange((c_ + group - 1) // group):
        lo, hi = _group(t, group, c_)
        for c in range(lo, hi):
            _backward_terms(terms, c, mean, var, weight, bias, eps, dtype)
        for n in range(n_):
            for c in range(lo, hi):
                mc = dtype(mean[c])
                row_s, row_q = _unit_grad_sums_row(v[n, c], y[n, c], dy[n, c], dz[n, c], mc, p)
                terms[4, c] += row_s
                terms[5, c] += row_q
        for c in range(lo, hi):
            _backward_constants(terms, grads, c, count, training)
        if dx.shape[0] == 0:
            continue
        for n in range(n_):
            for c in range(lo, hi):
                mc, ac = dtype(mean[c]), dtype(terms[0, c])
                k1c, k0c = dtype(terms[2, c]), dtype(terms[3, c])
                row, g, dst = v[n, c], dz[n, c], dx[n, c]
                for i in range(row.shape[0]):
                    dst[i] = ac * g[i] + k1c * (row[i] - mc) + k0c


# --------------------------------------------------------------------------------------------
# RC kernels: x[r, c]; task = a block of rows, partial sums per (block, channel). As the NCS
# kernels, they read the input (x or v) from column c0 on (C columns: the vectors' length).
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _row_range(blk, r_, blocks):
    size = (r_ + blocks - 1) // blocks
    return blk * size, min(r_, (blk + 1) * size)


# In RC loops every element also touches its channel's parameters and accumulators: the
# per-channel vectors come in the input's dtype, and sums are kept per chunk of _CHUNK rows in
# that dtype (in scratch rows given by the caller: nothing is allocated inside the parallel loop,
# where an allocator's per-thread caches can cost more than a small kernel), then added into
# float64 (the shift keeps the chunk sums small, so float32 input loses nothing measurable).
_CHUNK = 32


@njit(inline="always", **_JIT)
def _zeroed(s, q, total_s, total_q):
    """A task's chunk accumulators and totals, zeroed (the buffers are reused between calls)."""
    s[:] = 0.0
    q[:] = 0.0
    total_s[:] = 0.0
    total_q[:] = 0.0
    return s, q


@njit(inline="always", **_JIT)
def _flush(chunk, total):
    for c in range(chunk.shape[0]):
        total[c] += chunk[c]
        chunk[c] = 0.0


@njit(parallel=True, **_JIT)
def _rc_stats(x, c0, k, blocks, out_sum, out_sq, scratch):
    r_, c_ = x.shape[0], k.shape[0]
    for blk in prange(blocks):
        s, q = _zeroed(scratch[0, blk], scratch[1, blk], out_sum[blk], out_sq[blk])
        lo, hi = _row_range(blk, r_, blocks)
        for first in range(lo, hi, _CHUNK):
            for r in range(first, min(hi, first + _CHUNK)):
                row = x[r, c0 : c0 + c_]
                for c in range(c_):
                    d = row[c] - k[c]
                    s[c] += d
                    q[c] += d * d
            _flush(s, out_sum[blk])
            _flush(q, out_sq[blk])


@njit(parallel=True, **_JIT)
def _rc_apply(x, c0, out, mean, a, b, code, p, blocks):
    r_, c_ = out.shape
    for blk in prange(blocks):
        lo, hi = _row_range(blk, r_, blocks)
        for r in range(lo, hi):
            row, dst = x[r, c0 : c0 + c_], out[r]
            if code == _LINEAR:
                for c in range(c_):
                    dst[c] = _linear_act((row[c] - mean[c]) * a[c] + b[c], p)
            else:
                for c in range(c_):
                    dst[c] = _act((row[c] - mean[c]) * a[c] + b[c], code, p)


@njit(parallel=True, **_JIT)
def _rc_apply_add(x, r, out, mean, a, b, p, blocks):
    r_, c_ = x.shape
    for blk in prange(blocks):
        lo, hi = _row_range(blk, r_, blocks)
        for i in range(lo, hi):
            row, res, dst = x[i], r[i], out[i]
            for c in range(c_):
                dst[c] = _linear_act((row[c] - mean[c]) * a[c] + b[c] + res[c], p)


@njit(parallel=True, **_JIT)
def _rc_grad_sums(v, dy, mean, at, bt, code, p, from_output, blocks, out_dz, out_dzx, scratch):
    r_, c_ = v.shape
    for blk in prange(blocks):
        s, q = _zeroed(scratch[0, blk], scratch[1, blk], out_dz[blk], out_dzx[blk])
        lo, hi = _row_range(blk, r_, blocks)
        for first in range(lo, hi, _CHUNK):
            for r in range(first, min(hi, first + _CHUNK)):
                _rc_row_grad_sums(v[r], dy[r], mean, at, bt, code, p, from_output, s, q)
            _flush(s, out_dz[blk])
            _flush(q, out_dzx[blk])


@njit(parallel=True, **_JIT)
def _rc_grad_sums_at(
    v, c0, dy, mean, at, bt, code, p, from_output, blocks, out_dz, out_dzx, scratch
):
    """:func:`_rc_grad_sums` reading v from column c0 (a concatenation's buffer). A kernel of its
    own: the column slice in the plain kernel made its rows of ~1000 channels 1.3x slower."""
    r_, c_ = dy.shape
    for blk in prange(blocks):
        s, q = _zeroed(scratch[0, blk], scratch[1, blk], out_dz[blk], out_dzx[blk])
        lo, hi = _row_range(blk, r_, blocks)
        for first in range(lo, hi, _CHUNK):
            for r in range(first, min(hi, first + _CHUNK)):
                row = v[r, c0 : c0 + c_]
                _rc_row_grad_sums(row, dy[r], mean, at, bt, code, p, from_output, s, q)
            _flush(s, out_dz[blk])
            _flush(q, out_dzx[blk])


@njit(inline="always", **_JIT)
def _rc_row_grad_sums(row, g, mean, at, bt, code, p, from_output, s, q):
    if code == _LINEAR:
        for c in range(g.shape[0]):
            dz, xc = _linear_grad(row[c], g[c], mean[c], at[c], bt[c], p, from_output)
            s[c] += dz
            q[c] += dz * xc
    else:
        for c in range(g.shape[0]):
            dz, xc = _grad(row[c], g[c], mean[c], at[c], bt[c], code, p, from_output)
            s[c] += dz
            q[c] += dz * xc


@njit(parallel=True, **_JIT)
def _rc_grad_input(v, c0, dy, dx, mean, at, bt, k1t, k0t, code, p, from_output, blocks):
    r_, c_ = dx.shape
    for blk in prange(blocks):
        lo, hi = _row_range(blk, r_, blocks)
        for r in range(lo, hi):
            row, g, dst = v[r, c0 : c0 + c_], dy[r], dx[r]
            if code == _LINEAR:
                for c in range(c_):
                    dz, xc = _linear_grad(row[c], g[c], mean[c], at[c], bt[c], p, from_output)
                    dst[c] = at[c] * dz + k1t[c] * xc + k0t[c]
            else:
                for c in range(c_):
                    dz, xc = _grad(row[c], g[c], mean[c], at[c], bt[c], code, p, from_output)
                    dst[c] = at[c] * dz + k1t[c] * xc + k0t[c]


# --------------------------------------------------------------------------------------------
# the in-place residual unit's backward: y = act(z + r) kept (over x) with r; act piecewise linear
# with p > 0, so z = act^-1(y) - r and dz = dy act'(y) come from (y, r, dy) at each position
# --------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _residual_grad(y, res, g, a, b, p):
    """(dz, x - k) at one position of the in-place residual unit: :func:`_linear_grad` from the
    output, the residual folded into the shift (z - res - b = act^-1(y) - (b + res)); its mean
    argument is unused there (b stands in, of the loop's dtype)."""
    return _linear_grad(y, g, b, a, b + res, p, True)


@njit(parallel=True, **_JIT)
def _ncs_res_grad_sums(y, res, dy, a, b, p, blocks, out_dz, out_dzx):
    n_, c_, s_ = y.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        ac, bc = a[c], b[c]
        row, rr, g = y[n, c, lo:hi], res[n, c, lo:hi], dy[n, c, lo:hi]
        s = 0.0
        q = 0.0
        for first in range(0, row.shape[0], _SPAN):
            end = first + _SPAN
            ys, rs, gs = row[first:end], rr[first:end], g[first:end]
            cs = y.dtype.type(0)
            cq = y.dtype.type(0)
            for i in range(ys.shape[0]):
                dz, xc = _residual_grad(ys[i], rs[i], gs[i], ac, bc, p)
                cs += dz
                cq += dz * xc
            s += cs
            q += cq
        out_dz[t] = s
        out_dzx[t] = q


@njit(parallel=True, **_JIT)
def _ncs_res_grad_input(y, res, dy, dx, dres, a, b, k1, k0, p, blocks):
    n_, c_, s_ = y.shape
    for t in prange(n_ * c_ * blocks):
        n, c, lo, hi = _task(t, c_, s_, blocks)
        ac, bc, k1c, k0c = a[c], b[c], k1[c], k0[c]
        row, rr, g = y[n, c, lo:hi], res[n, c, lo:hi], dy[n, c, lo:hi]
        dst, dr = dx[n, c, lo:hi], dres[n, c, lo:hi]
        for i in range(row.shape[0]):
            dz, xc = _residual_grad(row[i], rr[i], g[i], ac, bc, p)
            dst[i] = ac * dz + k1c * xc + k0c
            dr[i] = dz


@njit(parallel=True, **_JIT)
def _rc_res_grad_sums(y, res, dy, at, bt, p, blocks, out_dz, out_dzx, scratch):
    r_, c_ = y.shape
    for blk in prange(blocks):
        s, q = _zeroed(scratch[0, blk], scratch[1, blk], out_dz[blk], out_dzx[blk])
        lo, hi = _row_range(blk, r_, blocks)
        for first in range(lo, hi, _CHUNK):
            for r in range(first, min(hi, first + _CHUNK)):
                row, rr, g = y[r], res[r], dy[r]
                for c in range(c_):
                    dz, xc = _residual_grad(row[c], rr[c], g[c], at[c], bt[c], p)
                    s[c] += dz
                    q[c] += dz * xc
            _flush(s, out_dz[blk])
            _flush(q, out_dzx[blk])


@njit(parallel=True, **_JIT)
def _rc_res_grad_input(y, res, dy, dx, dres, at, bt, k1t, k0t, p, blocks):
    r_, c_ = y.shape
    for blk in prange(blocks):
        lo, hi = _row_range(blk, r_, blocks)
        for r in range(lo, hi):
            row, rr, g, dst, dr = y[r], res[r], dy[r], dx[r], dres[r]
            for c in range(c_):
                dz, xc = _residual_grad(row[c], rr[c], g[c], at[c], bt[c], p)
                dst[c] = at[c] * dz + k1t[c] * xc + k0t[c]
                dr[c] = dz


# --------------------------------------------------------------------------------------------
# layouts and task splitting
# --------------------------------------------------------------------------------------------


def supports(op: str, x: Tensor) -> bool:
    """CPU float32/float64, contiguous or channels_last, non-empty; no masked statistics."""
    return (
        op in _OPS
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.numel() > 0
        and is_dense(x)
    )


def prefers(op: str, x: Tensor, activation: Optional[str] = None) -> bool:
    """What automatic selection should give these kernels (measured with benchmarks/bn_speed.py,
    2 threads; below a threshold ATen's forward with its C++ autograd costs less than a Numba
    call's fixed cost plus bnlab's Python backward).

    - Channels innermost ((N, C), channels_last) with many channels: ATen's per-channel vector loops
      already stream at memory speed; only a fused activation on a large (N, C) tensor gains from
      these kernels (BN + ReLU 4096x1024 1.4x of torch.nn's), and not with thousands of channels,
      whose parameters and sums per row outrun L1 (256x4096: 0.80x, ATen's BN then ReLU 0.96x).
      channels_last images gained alone (BN + ReLU 8x192x56x56 2.2x, 8x384x28x28 1.3x) but lost
      inside models: densenet121's training step at 8x3x224x224 channels_last (timm's
      BatchNormAct2d, convert's defaults; 37 of its 121 layers, 1.6M-6.4M values, through these
      kernels), 8 fresh processes each, median paired ratio to torch.nn 0.954x through them and
      1.006x through ATen's BN then ReLU (benchmarks/model_speed.py with the rule switched
      in-process).
    - Few channels innermost: ATen's loops are short and slow there; these kernels from 1M values in
      training: inside mobilenetv3_large_100 (channels_last, 16x3x64x64: 16 and 24 channels over
      98K-262K values) a training step ran 0.93x torch.nn's speed through them and 0.98x through
      ATen's. channels_last images train on them only below 8 channels (ATen's vector loop then
      partly empty: 16x3x224x224 BN alone 19-26x): from 8 channels they lost inside models, 6 fresh
      processes each, median paired ratio to torch.nn (the control's): r3d_small's training step
      (channels_last_3d, 16x3x8x64x64, three BatchNorm3d(16) over 2.1M values) 0.955x (0.99x)
      through them and 0.993x (0.99x) through ATen's; mobilenetv3_large_100 (8x3x224x224, 16
      channels over 1.6M values) 0.980x (0.985x) and 1.012x (1.02x) (benchmarks/model_speed.py with
      the rule switched in-process). Rows (N, C) of 16 channels also go to ATen, which is as fast
      there as at 32 and 3-5x faster than at 12-28 (BN alone, (65536, C) forward + backward, ms,
      these kernels / ATen: C=12 1.50 / 6.97, 16 0.67 / 0.84, 20 0.63 / 4.27, 32 0.66 / 0.56): a
      tabular MLP (three Linear + BatchNorm1d + ReLU of width C, batch B, 1-3 alternating processes
      each way) trained at 0.88-0.93x torch.nn's speed through these kernels and 0.995-1.012x
      through ATen's with C=16 (B=65536, 70000, 100000, 262144; with ATEN_CPU_CAPABILITY=avx2,
      B=65536, 0.913x against 0.958x), while these kernels gave 1.41x (C=4, B=262144), 1.35x (C=8,
      B=131072; 1.28-1.47x under avx2), 1.19x (C=24, B=65536; 1.14x under avx2). Its eval forward at
      B=262144 (4.2M values, which the eval rule below gave these kernels) ran 0.920x (0.894-0.927,
      3 processes) through them, 0.993x and 1.011x through ATen's in two alternating runs (0.888x,
      0.881x before). In eval, below 8 channels (ATen's vector loop is then partly empty) or from 4M
      values; eval module calls, channels_last, ATen's time / these kernels': 16x3x64x64 1.31,
      16x3x224x224 1.61, 16x16x128x128 1.15, 32x24x64x64 1.04, but 16x24x32x32 0.39, 16x8x64x64
      0.42, 16x16x64x64 0.56, 16x8x128x128 0.71 (they took every eval from 64K values until
      mobilenetv3's 16- and 24-channel layers evaluated at 4x ATen's time inside the model).
    - Rows of spatial values (NCS): the training forward from 1M values (fused with an
      activation too), or from 64K when rows are long (S >= 4096); below that a full training step
      (forward + backward) was 0.6-0.9x through these kernels and 0.9-0.95x through ATen's
      differentiable op (32x64x8x8, 64x8x16x16, 64x64x8x8). Inside a model, where each input comes
      fresh from a convolution, the forward alone (timm ResNet-50, 8x3x224x224, per layer, torch.nn
      time / these kernels'): 8x128x28x28 (800K) 0.81-0.93x, 8x64x56x56 (1.6M) 1.03-1.25x,
      8x128x56x56 1.44x, 8x256x56x56 1.08-2.1x, 8x64x112x112 1.71x; with both passes by channel
      (torch.profiler, ms a step summed over the layers of a shape, ATen's / these kernels'):
      8x64x56x56 8.1 / 3.8, 8x1024x14x14 13.1 / 5.6, 8x256x28x28 1.6 / 0.8, 8x128x28x28 5.1 / 3.0
      but their bnlab-side backward wrapper ate that, 8x2048x7x7 2.8 / 1.9 (the same). The
      backward from 2M values: below, ATen's single C++ call costs less than the Python around
      these kernels, which inside a model (each Python and torch call starting on caches a
      convolution has just swept) is 0.2-0.3 ms a call. Eval: ATen's single streaming pass is as
      fast.
    - Only the piecewise-linear activations (identity, relu, leaky_relu) fused: Numba does not
      vectorize exp, erf or tanh (no SVML), and its branchy hardswish / hardsigmoid loops lose to
      ATen's batch norm followed by PyTorch's vectorized activation. Forward, 2 threads, torch.nn
      time / these kernels' (> 1: faster here), eval and train: 16x96x16x16 silu 0.20 / 0.43,
      hardswish 0.27 / 0.68; 32x64x32x32 silu 0.17 / 0.52, hardswish 0.38 / 1.12, relu 1.65 /
      1.93, leaky_relu 1.52 / 2.68; a training step at 32x64x32x32 2.2-3.5x slower with gelu,
      gelu_tanh, 1.0-1.2x with elu. Whole models: efficientnet_b0 (SiLU after every BN) trained
      at 0.79x and evaluated at 0.68x torch.nn's speed when its SiLU ran here
      (benchmarks/model_speed.py, 16x3x64x64).
    - Eval with an activation: ATen's batch norm then PyTorch's in-place activation. Fused here,
      mobilenetv3_large_100's channels_last eval forward (16 and 24 channels innermost, 16x3x64x64)
      spent 3.3 ms in these kernels against 1.4 ms that way (0.88x torch.nn's whole forward).
    """
    if op == "batch_norm_act_eval":
        return False
    numel = x.numel()
    if numel < _NUMBA_FROM_NUMEL:  # every rule below needs at least this many values
        return False
    slow_activation = activation is not None and activation not in _NUMBA_FAST_ACTIVATIONS
    if op == "batch_norm_act" and slow_activation:  # None: not said, as before activations mattered
        return False
    rows_of_channels = _spatial(x) == 1  # (N, C) or (N, C, 1, ...)
    channels_innermost = rows_of_channels or (is_channels_last(x) and not x.is_contiguous())
    if channels_innermost and x.shape[1] >= _NATIVE_FROM_CHANNELS:
        return (
            op == "batch_norm_act"
            and rows_of_channels  # channels_last images lost inside models
            and numel >= _ACT_WIDE_ROWS_FROM_NUMEL
            and x.shape[1] <= _ACT_WIDE_ROWS_MAX_CHANNELS
        )
    if rows_of_channels and x.shape[1] == _ATEN_FAST_ROW_CHANNELS:
        return False  # ATen's loops are not short there, in training or eval
    if channels_innermost and op == "batch_norm_eval":  # ATen's vector loop needs 8 channels
        return x.shape[1] < _FULL_VECTOR_CHANNELS or numel >= _FEW_CHANNELS_EVAL_FROM_NUMEL
    if channels_innermost:  # few channels: ATen's loops are short
        if not rows_of_channels and x.shape[1] >= _FULL_VECTOR_CHANNELS:
            return False  # channels_last images lost inside models from 8 channels
        return numel >= _FEW_CHANNELS_TRAINING_FROM_NUMEL
    if op == "batch_norm_backward":
        return numel >= _NUMBA_BACKWARD_FROM_NUMEL
    if op in _NCS_FORWARD_FROM_NUMEL:
        return numel >= _NCS_FORWARD_FROM_NUMEL[op] or _spatial(x) >= _LONG_ROW
    return False


def _rows(x: Tensor) -> np.ndarray:
    """The NCS (N, C, S) or RC (R, C) NumPy view of x (no copy)."""
    x, c = x.detach(), x.shape[1]
    if _spatial(x) == 1:  # (N, C) or (N, C, 1, ...): one row of channels per example
        return x.reshape(x.shape[0], c).numpy()
    if x.is_contiguous():
        return x.view(x.shape[0], c, -1).numpy()
    order = (0, *range(2, x.dim()), 1)  # channels last in memory: this permute is contiguous
    return x.permute(order).reshape(-1, c).numpy()


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def openmp_pool_started() -> bool:
    """Whether Numba's threading layer has started on GNU OpenMP in this process (these kernels'
    first call starts it, as can any parallel Numba code). GNU OpenMP cannot run a parallel region
    in a process forked after that: Numba terminates such a child (SIGTERM, "fork() called from a
    process already using GNU OpenMP") at its first parallel call, which is every kernel here."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # not started: a child starts its own pool
        return False
    if layer != "omp":  # TBB and the workqueue survive a fork
        return False
    from numba.np.ufunc import omppool

    return getattr(omppool, "openmp_vendor", None) == "GNU"


FORKED_AFTER_OPENMP = (
    "this process was forked after parallel Numba code (bnlab's CPU kernels) started GNU OpenMP "
    "threads in its parent, and GNU OpenMP cannot run in such a child (Numba would terminate "
    "it); automatic selection runs ATen's kernels here. To keep bnlab's kernels in child "
    "processes, start them with multiprocessing's 'spawn' or 'forkserver' method"
)


def _threads() -> int:
    """Follow torch's intra-op thread setting (e.g. torch.set_num_threads(1) in the lab).

    Numba's OpenMP pool resets the OpenMP thread count when it starts, which torch shares on some
    builds: torch's setting is put back afterwards. Numba's count (per thread) is set again only
    when torch's changes: ``numba.set_num_threads`` takes Numba's process-wide launch lock, which
    inside a model cost ~0.2 ms a call (a sampling profile of ResNet-50's training step).
    """
    wanted = torch.get_num_threads()
    if getattr(_LOCAL, "torch_threads", None) == wanted:
        return _LOCAL.numba_threads
    n = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    _LOCAL.torch_threads, _LOCAL.numba_threads = wanted, n
    return n


_RC_ROW = 256  # RC rows shorter than this are joined k at a time: long inner loops vectorize
_NATIVE_FROM_CHANNELS = 32  # see prefers()
_NUMBA_FROM_NUMEL = 1 << 16
_NUMBA_BACKWARD_FROM_NUMEL = 1 << 21
_FEW_CHANNELS_TRAINING_FROM_NUMEL = 1 << 20
_FEW_CHANNELS_EVAL_FROM_NUMEL = 1 << 22
_ATEN_FAST_ROW_CHANNELS = 16  # (N, 16) rows: ATen's loops are fast there, see prefers()
_FULL_VECTOR_CHANNELS = 8  # channels innermost below this: ATen's vector loop partly empty
_NCS_FORWARD_FROM_NUMEL = {"batch_norm": 1 << 20, "batch_norm_act": 1 << 20}
_LONG_ROW = 4096
_NUMBA_FAST_ACTIVATIONS = ("identity", "relu", "leaky_relu")
_ACT_WIDE_ROWS_FROM_NUMEL = 1 << 20  # >= _NUMBA_FROM_NUMEL (prefers() tests that one first)
_ACT_WIDE_ROWS_MAX_CHANNELS = 2048


class _Plan:
    """How the kernels walk one tensor: its NCS or RC view, and for RC how many rows of C are
    joined into one row of k * C (per-channel vectors are then tiled k times and partial sums
    folded back), so that 3 channels still run in long vectorized loops."""

    def __init__(self, x: Tensor):
        rows = _rows(x)
        self.channels, self.k = x.shape[1], 1
        if rows.ndim == 2:
            r, c = rows.shape
            self.k = max(1, _RC_ROW // c)
            while r % self.k:
                self.k -= 1
            rows = rows.reshape(r // self.k, self.k * c)
        self.view = rows
        if rows.ndim == 3:
            self.kernels = (_ncs_stats, _ncs_apply, _ncs_grad_sums, _ncs_grad_input)
        else:
            self.kernels = (_rc_stats, _rc_apply, _rc_grad_sums_from_0, _rc_grad_input)
        self.residual_kernels = (
            (_ncs_apply_add, _ncs_res_grad_sums, _ncs_res_grad_input)
            if rows.ndim == 3
            else (_rc_apply_add, _rc_res_grad_sums, _rc_res_grad_input)
        )
        self.blocks = self._blocks(_threads() * _TASKS_PER_THREAD)

    def _blocks(self, target: int) -> int:
        """How many pieces each NCS row (or the RC row range) is cut into."""
        if self.view.ndim == 3:
            return _ncs_blocks(self.view.shape[0] * self.channels, self.view.shape[2], target)
        return max(1, min(target, self.view.shape[0] // 8))

    def of(self, t: Tensor) -> np.ndarray:
        """The same view of another tensor laid out like this one (y, dy, dx)."""
        return _rows(t).reshape(self.view.shape)

    def scalar(self, value: float):
        """A scalar in the dtype the loops compute in (the input's)."""
        return self.view.dtype.type(value)

    def tile(self, *vectors: np.ndarray) -> list[np.ndarray]:
        """Per-channel vectors in the input's dtype, repeated k times for joined RC rows."""
        dtype = self.view.dtype
        return [(np.tile(v, self.k) if self.view.ndim == 2 else v).astype(dtype) for v in vectors]

    def centre(self, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, k - mean): the loops compute x - k with k = mean rounded to the input's dtype (exact
        for x near the mean), and the wrapper adds the small float64 rest k - mean back into the
        per-channel terms, so float32 loops lose nothing to a large mean."""
        k = mean.astype(self.view.dtype).astype(np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf in a non-finite batch stays NaN
            return k, k - mean

    def sums(self, kernel, *args) -> tuple[np.ndarray, np.ndarray]:
        """Run a partial-sum kernel; its per-task float64 results added per channel."""
        view, c = self.view, self.channels
        if view.ndim == 3:
            first = np.empty(view.shape[0] * c * self.blocks)
            second = np.empty_like(first)
            kernel(view, *args, self.blocks, first, second)
            return (
                first.reshape(-1, c, self.blocks).sum(axis=(0, 2)),
                second.reshape(-1, c, self.blocks).sum(axis=(0, 2)),
            )
        first, second, scratch = _workspace(self.blocks, c * self.k, view.dtype)
        kernel(view, *args, self.blocks, first, second, scratch)
        return first.reshape(-1, c).sum(axis=0), second.reshape(-1, c).sum(axis=0)


class _ConcatPlan(_Plan):
    """The plan of channels 0 .. C of ``buffer`` (N, C_buf, *spatial), contiguous (NCS) or
    channels_last (RC): the kernels read the input from the buffer and write (or read) (N, C, S)
    or (R, C) arrays for everything else (y, dy, dx: laid out as the buffer)."""

    def __init__(self, buffer: Tensor, channels: int):
        if buffer.is_contiguous():
            self.view = buffer.view(buffer.shape[0], buffer.shape[1], -1).numpy()
            self.kernels = (_ncs_stats, _ncs_apply, _ncs_grad_sums, _ncs_grad_input)
        else:  # channels_last: (R, C_buf) rows
            self.view = _rows(buffer)
            self.kernels = (_rc_stats, _rc_apply, _rc_grad_sums_at, _rc_grad_input)
        self.channels, self.k = channels, 1
        self.blocks = self._blocks(_threads() * _TASKS_PER_THREAD)
        n, _, s = self.view.shape if self.view.ndim == 3 else (0, 0, 0)
        self.group = _channel_group(n, channels, s, self.view.itemsize) if n else 0

    def of(self, t: Tensor) -> np.ndarray:
        if self.view.ndim == 3:
            return t.view(self.view.shape[0], self.channels, -1).numpy()
        return _rows(t)


def _channel_group(batch: int, channels: int, spatial: int, itemsize: int) -> int:
    """How many channels a task of the NCS kernels by channel takes: rows of about
    _GROUP_VALUES values, so that short rows still stream, while the group's values stay within
    _GROUP_BYTES (the second pass must find them in the core's cache: 256x256x14x14 in groups of
    11 channels, 2.2 MB, ran its backward at 0.85-0.92x the two-kernel path's speed, in groups of
    2 at 1.04x); 0 where too few channels give each thread _CHANNELS_PER_THREAD tasks: then the
    two-kernel path runs, as it does where one channel's values pass _CHANNEL_BYTES (the second
    pass would read them from memory again: nothing gained over the two kernels, which stream
    the whole tensor in order). Sets Numba's thread count."""
    tasks = _CHANNELS_PER_THREAD * _threads()
    if channels < tasks or batch * spatial * itemsize > _CHANNEL_BYTES:
        return 0
    fitting = _GROUP_BYTES // (batch * spatial * itemsize)
    return max(1, min(-(-_GROUP_VALUES // spatial), fitting, channels // tasks))


def _group_of(x: Tensor) -> int:
    """:func:`_channel_group` of x where its NCS view is a plain view (contiguous, rank >= 3,
    spatial size > 1), else 0."""
    if x.dim() < 3 or not x.is_contiguous() or not x.numel():
        return 0
    spatial = _spatial(x)
    if spatial <= 1:
        return 0
    return _channel_group(x.shape[0], x.shape[1], spatial, x.element_size())


def _ncs(t: Tensor) -> np.ndarray:
    """The (N, C, S) NumPy view of a contiguous tensor."""
    return t.detach().view(t.shape[0], t.shape[1], -1).numpy()


_NO_VECTOR = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0)}
_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}
_NO_ROWS = {dtype: np.empty((0, 0, 0), vector.dtype) for dtype, vector in _NO_VECTOR.items()}


def _vectors(dtype: torch.dtype, *vectors) -> list[np.ndarray]:
    """Per-channel vectors (tensors, NumPy arrays or None) for the kernels by channel, None as an
    empty vector: as they are where each is a CPU tensor of ``dtype``, else all as float64 (one
    kernel signature either way)."""
    if all(v is None or (isinstance(v, Tensor) and v.dtype == dtype) for v in vectors):
        if all(v is None or v.device.type == "cpu" for v in vectors):
            return [_NO_VECTOR[dtype] if v is None else v.detach().numpy() for v in vectors]
    return [
        _NO_VECTOR[torch.float64]
        if v is None
        else np.asarray(v.detach().cpu().numpy() if isinstance(v, Tensor) else v, np.float64)
        for v in vectors
    ]


def _ncs_blocks(rows: int, length: int, target: int) -> int:
    """Pieces per row of ``length`` values for ``rows`` rows: about ``target`` tasks, each of at
    least 1024 values."""
    return max(1, min(-(-target // rows), length // 1024 or 1))


def _rc_grad_sums_from_0(v, c0, *args):
    """:func:`_rc_grad_sums` in the signature of the plans' kernels (input, channel offset,
    ...), for inputs read from column 0: the plain kernel takes no offset (its rows of ~1000
    channels ran 1.3x slower with one; see :func:`_rc_grad_sums_at`)."""
    return _rc_grad_sums(v, *args)


_LOCAL = threading.local()
_WORKSPACES_KEPT = 8


def _workspace(blocks: int, width: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-task float64 totals (two (blocks, width) arrays) and chunk scratch ((2, blocks, width)
    in the input's dtype) for the RC sums, kept per thread and reused (the kernels zero them):
    fresh arrays on every call cost page faults inside the parallel loop under some allocators
    (jemalloc: 256x4096 statistics 0.17 -> 2.4 ms)."""
    kept = _LOCAL.__dict__.setdefault("workspaces", {})
    key = (blocks, width, np.dtype(dtype).str)
    if key not in kept:
        if len(kept) >= _WORKSPACES_KEPT:
            kept.pop(next(iter(kept)))
        kept[key] = (
            np.empty((blocks, width)),
            np.empty((blocks, width)),
            np.empty((2, blocks, width), dtype),
        )
    return kept[key]


def _vector(t: Tensor | None, c: int, fill: float) -> np.ndarray:
    """A per-channel vector as a float64 NumPy copy (``fill`` where it is None)."""
    if t is None:
        return np.full(c, fill)
    if t.dtype in _DTYPES and t.device.type == "cpu":  # NumPy's cast costs a third of torch's
        return t.detach().numpy().astype(np.float64)
    return t.detach().to(torch.float64).numpy()


# --------------------------------------------------------------------------------------------
# the backend contract (bnlab.kernels.contract)
# --------------------------------------------------------------------------------------------


def statistics(x: Tensor, plan: _Plan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-channel mean and biased variance of x over every dim but 1."""
    plan = plan or _Plan(x)
    rows = _rows(x)
    shift = np.asarray(rows[0] if rows.ndim == 2 else rows[0, :, 0], dtype=np.float64)
    s, q = plan.sums(plan.kernels[0], 0, *plan.tile(shift))
    return _moments(shift, s, q, x.numel() // x.shape[1])


def _moments(shift, s, q, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, biased variance) from the sums of x - shift and of its squares over ``count``."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN batches stay non-finite
        mean = shift + s / count
        var = np.maximum((q - s * s / count) / count, 0.0)
    return mean, var


def _act_forward(
    x, weight, bias, running_mean, running_var, training, eps, activation, param, out, residual=None
):
    """:meth:`bnlab.kernels.contract.Kernels.batch_norm_act_forward`, every argument given: one
    statistics pass in training, one normalizing pass (which adds ``residual`` before the
    activation when given: the piecewise-linear activations only)."""
    code, p = activation_code(activation, param)
    if residual is not None and code != _LINEAR:
        raise ValueError(f"a residual goes before identity, relu or leaky_relu, not {activation}")
    group = _group_of(x) if training else 0
    if group:
        return _forward_by_channel(x, weight, bias, eps, code, p, out, group, residual)
    c = x.shape[1]
    plan = _Plan(x)
    if training:
        mean, var = statistics(x, plan)
    else:
        mean, var = _vector(running_mean, c, 0.0), _vector(running_var, c, 1.0)
    a = _vector(weight, c, 1.0) / np.sqrt(var + eps)
    k, rest = plan.centre(mean)
    b = _vector(bias, c, 0.0) + rest * a  # y = (x - k) * a + b
    y = torch.empty_like(x) if out is None else out
    vectors, p = plan.tile(k, a, b), plan.scalar(p)
    if residual is None:
        plan.kernels[1](plan.view, 0, plan.of(y), *vectors, code, p, plan.blocks)
    else:
        r = plan.of(laid_out_like(residual, x))
        plan.residual_kernels[0](plan.view, r, plan.of(y), *vectors, p, plan.blocks)
    if training:
        return y, torch.from_numpy(mean).to(x.dtype), torch.from_numpy(var).to(x.dtype)
    empty = x.new_empty((0,))
    return y, empty, empty.clone()


def _forward_by_channel(x, weight, bias, eps, code, p, out, group, residual=None):
    """:func:`_act_forward` in training: :func:`_ncs_forward_by_channel`, its Python kept to the
    views (inside a model each NumPy call here costs tens of microseconds)."""
    c = x.shape[1]
    y = torch.empty_like(x) if out is None else out
    mean, var = x.new_empty(c), x.new_empty(c)
    weight, bias = _vectors(x.dtype, weight, bias)
    r = _NO_ROWS[x.dtype] if residual is None else _ncs(laid_out_like(residual, x))
    _ncs_forward_by_channel(
        _ncs(x), r, _ncs(y), weight, bias, float(eps), code, _SCALAR[x.dtype](p), group,
        mean.numpy(), var.numpy(), np.empty((2, c)),
    )  # fmt: skip
    return y, mean, var


def _backward_by_channel(
    grad_out, saved, weight, bias, mean, var, training, eps, activation, param, wanted,
    from_output, group,
):  # fmt: skip
    """:func:`_act_backward` (dx wanted) by :func:`_ncs_backward_by_channel`: one kernel call."""
    dx = torch.empty_like(saved)
    dy = laid_out_like(grad_out, saved)
    return dx, *_run_backward_by_channel(
        _ncs(saved), _ncs(dy), _ncs(dx), saved.dtype, weight, bias, mean, var, training, eps,
        activation, param, wanted, from_output, group,
    )  # fmt: skip


def _run_backward_by_channel(
    v, dy, dx, dtype, weight, bias, mean, var, training, eps, activation, param, wanted,
    from_output, group,
):  # fmt: skip
    """(dweight, dbias), each where wanted, of :func:`_ncs_backward_by_channel` run on the NCS
    views ``v`` (channels from 0), ``dy``, ``dx`` (dx written)."""
    c = dy.shape[1]
    grads = torch.empty((2, c), dtype=dtype)  # (dbias, dweight)
    code, p = activation_code(activation, param)
    _ncs_backward_by_channel(
        v, 0, dy, dx, *_vectors(dtype, mean, var, weight, bias), float(eps), code,
        _SCALAR[dtype](p), bool(from_output), bool(training), group, grads.numpy(),
        np.empty((6, c)),
    )  # fmt: skip
    return (grads[1] if weight is not None and wanted[1] else None), (
        grads[0] if wanted[2] else None
    )


def _sums_param_grads(sum_dz, sum_dz_xc, invstd, weight, wanted, dtype) -> tuple:
    """(dweight, dbias), each where wanted, from the two-kernel path's float64 sums."""
    dweight = dbias = None
    if weight is not None and wanted[1]:
        dweight = torch.from_numpy(sum_dz_xc * invstd).to(dtype)
    if wanted[2]:
        dbias = torch.from_numpy(sum_dz).to(dtype)
    return dweight, dbias


def _backward_passes(plan, dy, dx, k, rest, a, b, invstd, code, p, from_output, training, count):
    """The backward's sums, (sum(dz), sum(dz (x - mean))), and dx written when given (arrays laid
    out as ``plan.of``) by the two parallel kernels. ``count``: values per channel."""
    channels = plan.channels
    _, _, grad_sums, grad_input = plan.kernels
    vectors = plan.tile(k, a, b)
    sum_dz, sum_dz_xk = plan.sums(grad_sums, 0, dy, *vectors, code, p, from_output)
    sum_dz_xc = sum_dz_xk + rest * sum_dz  # sum(dz * (x - mean)) from sum(dz * (x - k))
    if dx is not None:
        k1 = -a * invstd * invstd * sum_dz_xc / count if training else np.zeros(channels)
        # k1 (x - mean) = k1 (x - k) + k1 rest: the rest goes into the constant term
        k0 = -a * sum_dz / count + k1 * rest if training else np.zeros(channels)
        vectors = plan.tile(k, a, b, k1, k0)
        grad_input(plan.view, 0, dy, dx, *vectors, code, p, from_output, plan.blocks)
    return sum_dz, sum_dz_xc


def _act_backward(
    grad_out, saved, weight, bias, mean, var, training, eps, activation, param, wanted, from_output
):
    """:meth:`bnlab.kernels.contract.Kernels.batch_norm_act_backward`, every argument given
    (``wanted``: the output mask), in the form
    dx = a dz - a invstd^2 (x - mean) sum(dz (x - mean)) / m - a sum(dz) / m, a = weight * invstd
    (eval: the first term). Two passes: the sums, then dx (by channel, or two parallel kernels:
    :func:`_backward_passes`); each recomputes z from x (or, ``from_output``, inverts the
    activation from y)."""
    group = _group_of(saved) if wanted[0] and mean is not None and var is not None else 0
    if group:
        return _backward_by_channel(
            grad_out, saved, weight, bias, mean, var, training, eps, activation, param, wanted,
            from_output, group,
        )  # fmt: skip
    c = saved.shape[1]
    mean64, var64 = _vector(mean, c, 0.0), _vector(var, c, 1.0)
    invstd = 1.0 / np.sqrt(var64 + eps)
    a = _vector(weight, c, 1.0) * invstd
    plan = _Plan(saved)
    k, rest = plan.centre(mean64)
    b = _vector(bias, c, 0.0) + rest * a  # z = (x - k) * a + b; the loops see x - k
    dy = plan.of(laid_out_like(grad_out, saved))
    code, p = activation_code(activation, param)
    dx = torch.empty_like(saved) if wanted[0] else None
    sum_dz, sum_dz_xc = _backward_passes(
        plan, dy, None if dx is None else plan.of(dx), k, rest, a, b, invstd, code,
        plan.scalar(p), bool(from_output), training, saved.numel() // c,
    )  # fmt: skip
    return dx, *_sums_param_grads(sum_dz, sum_dz_xc, invstd, weight, wanted, saved.dtype)


def batch_norm_add_act_backward(
    grad_out, y, residual, weight, bias, mean, var, training, eps, activation, param
):
    """Gradients (dx, dweight, dbias, dresidual) of the in-place residual unit y = act(batch_norm(x)
    + residual) (:func:`bnlab.functional.batch_norm_add_act`, ``inplace=True``) from y and the
    residual alone: act identity or leaky_relu (slope > 0), z = act^-1(y) - residual the batch
    norm's output, dz = dy act'(y) = dresidual. Two parallel passes, as
    :meth:`bnlab.kernels.contract.Kernels.batch_norm_act_backward` from the output; the second
    writes dx and dresidual."""
    c = y.shape[1]
    mean64, var64 = _vector(mean, c, 0.0), _vector(var, c, 1.0)
    invstd = 1.0 / np.sqrt(var64 + eps)
    a = _vector(weight, c, 1.0) * invstd
    plan = _Plan(y)
    k, rest = plan.centre(mean64)
    b = _vector(bias, c, 0.0) + rest * a
    dy = plan.of(laid_out_like(grad_out, y))
    res = plan.of(laid_out_like(residual, y))
    _, p = activation_code(activation, param)
    p = plan.scalar(p)
    _, grad_sums, grad_input = plan.residual_kernels
    sum_dz, sum_dz_xk = plan.sums(grad_sums, res, dy, *plan.tile(a, b), p)
    sum_dz_xc = sum_dz_xk + rest * sum_dz
    count = y.numel() // c
    k1 = -a * invstd * invstd * sum_dz_xc / count if training else np.zeros(c)
    k0 = -a * sum_dz / count + k1 * rest if training else np.zeros(c)
    dx, dres = torch.empty_like(y), torch.empty_like(y)
    vectors = plan.tile(a, b, k1, k0)
    grad_input(plan.view, res, dy, plan.of(dx), plan.of(dres), *vectors, p, plan.blocks)
    every = (True, True, True)
    return dx, *_sums_param_grads(sum_dz, sum_dz_xc, invstd, weight, every, y.dtype), dres


def batch_norm_add_act_backward_from_input(
    grad_out, y, x, weight, bias, mean, var, training, eps, activation, param, wanted
):
    """Gradients (dx, dweight, dbias, dresidual) of the residual unit y = act(batch_norm(x) +
    residual) (:func:`bnlab.functional.batch_norm_add_act`) from x and y, act relu or leaky_relu:
    dresidual = dz = dy act'(y), dx that of the batch norm's backward of dz. One kernel by channel
    (:func:`_ncs_unit_backward_by_channel`) reads x, y and dy once and writes dz and dx, where the
    two steps read dy and y for dz, then dz and x twice. None where it does not take x (see
    :func:`_channel_group`), or for identity (dz is dy itself): the caller takes the two steps."""
    code, p = activation_code(activation, param)
    group = _group_of(x) if code == _LINEAR and p != 1.0 and mean is not None else 0
    if not group:
        return None
    c, dtype = x.shape[1], x.dtype
    dz = torch.empty_like(x)
    dx = torch.empty_like(x) if wanted[0] else None
    grads = torch.empty((2, c), dtype=dtype)  # (dbias, dweight)
    _ncs_unit_backward_by_channel(
        _ncs(x), _ncs(laid_out_like(y, x)), _ncs(laid_out_like(grad_out, x)), _ncs(dz),
        _NO_ROWS[dtype] if dx is None else _ncs(dx), *_vectors(dtype, mean, var, weight, bias),
        float(eps), _SCALAR[dtype](p), bool(training), group, grads.numpy(), np.empty((6, c)),
    )  # fmt: skip
    dweight = grads[1] if weight is not None and wanted[1] else None
    return dx, dweight, grads[0] if wanted[2] else None, dz


# --------------------------------------------------------------------------------------------
# batch norm of concatenated features kept in one buffer (bnlab.concat)
# --------------------------------------------------------------------------------------------


def concat_statistics(buffer: Tensor, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-channel mean and biased variance of channels ``first .. first + count`` of
    ``buffer`` (N, C_buf, *spatial), contiguous or channels_last: one read of those channels."""
    plan = _ConcatPlan(buffer, count)
    view = plan.view
    shift = view[0, first : first + count, 0] if view.ndim == 3 else view[0, first : first + count]
    shift = shift.astype(np.float64)
    s, q = plan.sums(plan.kernels[0], first, shift.astype(view.dtype))
    return _moments(shift, s, q, buffer.numel() // buffer.shape[1])


def _concat_output(buffer: Tensor, channels: int) -> Tensor:
    """An empty (N, channels, *spatial) tensor laid out as the buffer."""
    shape = (buffer.shape[0], channels, *buffer.shape[2:])
    layout = dense_format(buffer)
    return torch.empty(shape, dtype=buffer.dtype, device=buffer.device, memory_format=layout)


def batch_norm_concat_forward(
    buffer, channels, mean, var, weight, bias, eps, activation, param
) -> Tensor:
    """y = act((x - mean) weight / sqrt(var + eps) + bias), x = ``buffer[:, :channels]``
    (``buffer``: (N, C_buf, *spatial), contiguous or channels_last; mean, var: float64 NumPy
    vectors, the batch's or the running ones): one pass reads x from the buffer and writes y
    (N, channels, *spatial), laid out as the buffer."""
    plan = _ConcatPlan(buffer, channels)
    a = _vector(weight, channels, 1.0) / np.sqrt(var + eps)
    k, rest = plan.centre(mean)
    b = _vector(bias, channels, 0.0) + rest * a
    y = _concat_output(buffer, channels)
    code, p = activation_code(activation, param)
    vectors = plan.tile(k, a, b)
    plan.kernels[1](plan.view, 0, plan.of(y), *vectors, code, plan.scalar(p), plan.blocks)
    return y


def batch_norm_concat_backward(
    grad_out, buffer, channels, weight, bias, mean, var, training, eps, activation, param, wanted
):
    """(dx, dweight, dbias) of :func:`batch_norm_concat_forward`, dx (N, channels, *spatial)
    laid out as the buffer: the two passes of
    :meth:`bnlab.kernels.contract.Kernels.batch_norm_act_backward` with x read from the buffer;
    ``wanted``: the output mask."""
    plan = _ConcatPlan(buffer, channels)
    if wanted[0] and plan.group:
        dx = _concat_output(buffer, channels)
        dy = plan.of(laid_out_like(grad_out, dx))
        return dx, *_run_backward_by_channel(
            plan.view, dy, plan.of(dx), buffer.dtype, weight, bias, mean, var, training, eps,
            activation, param, wanted, False, plan.group,
        )  # fmt: skip
    invstd = 1.0 / np.sqrt(var + eps)
    a = _vector(weight, channels, 1.0) * invstd
    k, rest = plan.centre(mean)
    b = _vector(bias, channels, 0.0) + rest * a
    dx = _concat_output(buffer, channels)
    dy = plan.of(laid_out_like(grad_out, dx))
    code, p = activation_code(activation, param)
    count = buffer.numel() // buffer.shape[1]
    sum_dz, sum_dz_xc = _backward_passes(
        plan, dy, plan.of(dx) if wanted[0] else None, k, rest, a, b, invstd, code,
        plan.scalar(p), False, training, count,
    )  # fmt: skip
    dx = dx if wanted[0] else None
    return dx, *_sums_param_grads(sum_dz, sum_dz_xc, invstd, weight, wanted, buffer.dtype)


def batch_statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See :meth:`bnlab.kernels.contract.Kernels.batch_statistics` (no ``mask`` here): computed in
    float64, returned in x's dtype."""
    mean, var = statistics(x)
    return torch.from_numpy(mean).to(x.dtype), torch.from_numpy(var).to(x.dtype)


def _statistics64(x: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 statistics, for a backward that recomputes them (nothing rounded in between)."""
    mean, var = statistics(x)
    return torch.from_numpy(mean), torch.from_numpy(var)


batch_norm_act_forward = activated(fused=_act_forward, adds_residual=True)
batch_norm_act_backward = activated_backward(fused=_act_backward)
batch_norm_forward, batch_norm_backward = plain_from_fused(
    _act_forward, _act_backward, _statistics64
)
