"""Composite PyTorch backend: any device, any floating dtype; the fallback behind every backend.

Plain functions with no autograd inside. Written only with differentiable PyTorch ops, so the
functional layer also uses the backward functions here to provide second derivatives (autograd
differentiates the hand-derived first derivative).

Numerical choices:

- float16/bfloat16 inputs are computed in float32 and their statistics stay float32;
- the batch variance used for normalizing is the biased one (divide by m), as in Algorithm 1;
- statistics are two-pass (the mean, then the mean of centred squares), not E[x^2] - E[x]^2, so
  they stay accurate far from zero;
- the output is normalized as ``(x - mean) * scale + shift``, never ``x * scale + (shift - mean *
  scale)``, which would cancel catastrophically for large |mean|.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .contract import require_invertible

_HALF = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def _acc(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _HALF else t


def reduction_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim 1: batch and spatial positions."""
    return [0, *range(2, x.dim())]


def per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor as (1, C, 1, ...) so it broadcasts against x."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def values_per_channel(x: Tensor) -> int:
    """m = N * prod(spatial): the number of values each channel's statistics run over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def is_channels_last(x: Tensor) -> bool:
    """True for a dense channels-last layout: channels innermost, then spatial, then batch."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense_format(x: Tensor) -> torch.memory_format:
    """The memory format of a dense tensor (:func:`is_dense`): contiguous, else channels_last
    (4-D) or channels_last_3d (5-D), the layouts bnlab's kernels walk."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def is_dense(x: Tensor) -> bool:
    """Contiguous or channels_last: a layout the fast kernels walk without copying."""
    return x.is_contiguous() or is_channels_last(x)


def laid_out_like(y: Tensor, x: Tensor) -> Tensor:
    """y in x's dtype and in the layout torch.empty_like(x) gives (what the fake kernels promise).

    A dense x's strides are what empty_like(x) gives, so the usual case allocates nothing extra
    (and returns before any dispatch: this runs on every call of every backend)."""
    if y.dtype == x.dtype and y.stride() == x.stride():
        return y
    y = y.to(x.dtype)
    if y.stride() == x.stride():
        return y
    expected = torch.empty_like(x)
    if y.stride() != expected.stride():
        y = expected.copy_(y)
    return y


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps, mask=None):
    """See :meth:`bnlab.kernels.contract.Kernels.batch_norm_forward`."""
    xa = _acc(x)
    if training:
        mean, var = batch_statistics(xa, mask)
        y = _normalize(xa, mean, var, weight, bias, eps)
        return laid_out_like(y, x), mean, var
    y = _normalize(xa, running_mean.to(xa.dtype), running_var.to(xa.dtype), weight, bias, eps)
    empty = xa.new_empty((0,))
    return laid_out_like(y, x), empty, empty.clone()


def batch_statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See :meth:`bnlab.kernels.contract.Kernels.batch_statistics`."""
    xa = _acc(x)
    dims = reduction_dims(xa)
    if mask is None:
        # The textbook two passes (mean, then centred squares): as exact as Welford, and on the CPU
        # many times faster than torch.var_mean over dims (0, 2, ...) (16x at 64x32x16x16).
        mean = xa.mean(dims, keepdim=True)
        centred = xa - mean
        return mean.flatten(), (centred * centred).mean(dims)
    valid = mask.unsqueeze(1)  # (N, 1, *spatial)
    count = mask.sum()
    # torch.where, not a product: padding may hold anything, inf and NaN included
    mean = torch.where(valid, xa, 0).sum(dims) / count
    var = torch.where(valid, xa - per_channel(mean, xa), 0).square().sum(dims) / count
    return mean, var


def _normalize(xa: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
    scale = torch.rsqrt(var + eps)  # (C,)
    if weight is not None:
        scale = scale * weight.to(xa.dtype)
    y = (xa - per_channel(mean, xa)) * per_channel(scale, xa)
    if bias is not None:
        y = y + per_channel(bias.to(xa.dtype), xa)
    return y


def batch_norm_backward(
    grad_out, x, weight, mean, var, training, eps, output_mask=(True, True, True), mask=None
):
    """See :meth:`bnlab.kernels.contract.Kernels.batch_norm_backward`. In training ``mean`` None
    recomputes the statistics from x in autograd-visible ops: second derivatives see their
    dependence on x."""
    xa, dy = _acc(x), _acc(grad_out)
    dims = reduction_dims(x)
    if mean is None:
        mean, var = batch_statistics(xa, mask if training else None)
    invstd = torch.rsqrt(var.to(xa.dtype) + eps)  # (C,)
    xhat = (xa - per_channel(mean.to(xa.dtype), xa)) * per_channel(invstd, xa)
    sum_dy = dy.sum(dims)  # (C,)
    sum_dy_xhat = (dy * xhat).sum(dims)  # (C,)
    dx = dweight = dbias = None
    if output_mask[0]:
        scale = invstd if weight is None else invstd * weight.to(xa.dtype)
        if not training:
            dx = dy * per_channel(scale, xa)
        else:
            count = values_per_channel(x) if mask is None else mask.sum()
            dx = training_input_grad(dy, xhat, scale, sum_dy, sum_dy_xhat, count, mask)
        dx = laid_out_like(dx, x)
    if weight is not None and output_mask[1]:
        dweight = sum_dy_xhat
    if output_mask[2]:
        dbias = sum_dy
    return dx, dweight, dbias


def training_input_grad(
    dy: Tensor,
    xhat: Tensor,
    scale: Tensor,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count,
    mask: Tensor | None = None,
) -> Tensor:
    """dx = scale * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m), per channel (scale = weight *
    invstd; the sums and m = ``count`` over everything the statistics saw, e.g. all ranks).

    With a ``mask`` only the valid positions moved the statistics, so the two terms through them
    apply there alone; every position's dy is in the sums (every output used the statistics).
    """
    through_stats = per_channel(sum_dy / count, dy) + xhat * per_channel(sum_dy_xhat / count, dy)
    if mask is not None:
        through_stats = torch.where(mask.unsqueeze(1), through_stats, 0)
    return per_channel(scale, dy) * (dy - through_stats)


def _hardsigmoid(z: Tensor) -> Tensor:
    """min(max(z + 3, 0), 6) / 6 as (z + 3) / 6 inside (-3, 3): its autograd gradient is dy / 6
    there and 0 elsewhere (torch's convention at the kinks), where torch's float64
    hardsigmoid_backward multiplies by 1/6 rounded to float32 (3e-8 relative). NaN stays NaN."""
    return torch.where(z <= -3.0, 0.0, torch.where(z >= 3.0, 1.0, (z + 3.0) / 6.0))


_ACTIVATE = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: torch.relu(z),
    "leaky_relu": lambda z, p: torch.nn.functional.leaky_relu(z, p),
    "elu": lambda z, p: torch.nn.functional.elu(z, p),
    "silu": lambda z, p: torch.nn.functional.silu(z),
    "hardswish": lambda z, p: torch.nn.functional.hardswish(z),
    "hardsigmoid": lambda z, p: _hardsigmoid(z),
    "gelu": lambda z, p: torch.nn.functional.gelu(z),
    "gelu_tanh": lambda z, p: torch.nn.functional.gelu(z, approximate="tanh"),
}


# written over z, where PyTorch has the in-place op
_ACTIVATE_IN_PLACE = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: torch.relu_(z),
    "leaky_relu": lambda z, p: torch.nn.functional.leaky_relu(z, p, inplace=True),
    "elu": lambda z, p: torch.nn.functional.elu(z, p, inplace=True),
    "silu": lambda z, p: torch.nn.functional.silu(z, inplace=True),
    "hardswish": lambda z, p: torch.nn.functional.hardswish(z, inplace=True),
}


def activate_fresh(z: Tensor, activation: str, param: float) -> Tensor:
    """:func:`activate` of a z nothing else holds (no backward keeps it: ATen's batch norm saves
    its input, not its output), written over z where PyTorch has the in-place op (no second tensor,
    no allocation): always without a graph, and under autograd for the activations whose backward
    PyTorch takes exactly from their output (relu, leaky_relu with slope >= 0), as timm's
    ``BatchNormAct2d`` with an in-place act runs; else a new tensor."""
    in_place = _ACTIVATE_IN_PLACE.get(activation)
    if z.requires_grad and not _backward_from_output(activation, param):
        in_place = None
    return in_place(z, param) if in_place is not None else activate(z, activation, param)


def _backward_from_output(activation: str, param: float) -> bool:
    """Whether PyTorch's in-place op of ``activation`` differentiates from its output alone and
    exactly. The others save a copy of their input first, refuse a negative slope in place, or
    lose precision that way (elu's y + alpha for alpha exp(z) cancels)."""
    return activation in ("identity", "relu") or (activation == "leaky_relu" and param >= 0.0)


def activate(z: Tensor, activation: str, param: float) -> Tensor:
    """act(z), torch.nn.functional's definitions: relu max(z, 0); leaky_relu z > 0 ? z : p z (slope
    p = ``param``); elu z > 0 ? z : p (exp(z) - 1) (alpha p); silu z sigmoid(z); hardswish
    z min(max(z + 3, 0), 6) / 6; hardsigmoid min(max(z + 3, 0), 6) / 6; gelu z Phi(z) =
    z (1 + erf(z / sqrt(2))) / 2; gelu_tanh z (1 + tanh(sqrt(2 / pi) (z + 0.044715 z^3))) / 2."""
    return _ACTIVATE[activation](z, param)


def activate_in_place(z: Tensor, activation: str, param: float) -> Tensor:
    """z overwritten with act(z): identity, relu and leaky_relu (as ``inplace=True`` modules)."""
    if activation == "relu":
        return z.relu_()
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, param)
    return z


def _hardsigmoid_grad(dy: Tensor, z: Tensor, param: float) -> Tensor:
    """dy / 6 on the open interval (-3, 3), 0 elsewhere (torch's convention at the kinks)."""
    return torch.where((z > -3.0) & (z < 3.0), dy / 6.0, 0.0)


# ATen's activation backward kernels: torch.where with a scalar branch is ~20x slower on the CPU
# (2.3 ms on 256x4096); each has torch's branch convention at the kinks
_ACTIVATION_GRAD = {
    "identity": lambda dy, z, p: dy,
    "relu": lambda dy, z, p: torch.ops.aten.threshold_backward(dy, z, 0.0),
    "leaky_relu": lambda dy, z, p: torch.ops.aten.leaky_relu_backward(dy, z, p, False),
    "elu": lambda dy, z, p: torch.ops.aten.elu_backward(dy, p, 1.0, 1.0, False, z),
    "silu": lambda dy, z, p: torch.ops.aten.silu_backward(dy, z),
    "hardswish": lambda dy, z, p: torch.ops.aten.hardswish_backward(dy, z),
    "hardsigmoid": _hardsigmoid_grad,
    "gelu": lambda dy, z, p: torch.ops.aten.gelu_backward(dy, z, approximate="none"),
    "gelu_tanh": lambda dy, z, p: torch.ops.aten.gelu_backward(dy, z, approximate="tanh"),
}


def activation_grad(dy: Tensor, z: Tensor, activation: str, param: float) -> Tensor:
    """dy * act'(z). At the kinks torch's convention: relu' (0) = 0, leaky_relu' (0) = p, elu' (0)
    = p; hardswish' is 0 for z <= -3, z / 3 + 1/2 for -3 < z < 3, 1 for z >= 3; hardsigmoid' is
    1/6 on (-3, 3) only."""
    return _ACTIVATION_GRAD[activation](dy, z, param)


def invert_activation(y: Tensor, activation: str, param: float) -> Tensor:
    """z with act(z) = y, for the invertible activations (identity, leaky_relu, elu)."""
    if activation == "leaky_relu":
        return torch.where(y >= 0, y, y / param)
    if activation == "elu":
        return torch.where(y >= 0, y, torch.log1p(y / param))
    return y


# the adapters' docstrings: the contract's, and what runs it
_SEE = "See :meth:`bnlab.kernels.contract.Kernels"
_FUSED = "the backend's kernels, the activation in the same passes"


def activated(batch_norm_forward=None, fused=None, adds_residual=False):
    """``batch_norm_act_forward`` of a backend, the contract's signature and defaults written once
    for every backend: its ``fused`` kernel (the activation applied in the same pass; it takes
    every argument, positionally, and the residual after them when it ``adds_residual``) when it
    has one, else its ``batch_norm_forward`` then PyTorch's addition and activation (written into
    ``out`` when given). The function's ``adds_residual`` tells whether its kernel adds the
    residual in the same pass."""

    def batch_norm_act_forward(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        eps,
        activation="identity",
        param=0.0,
        out=None,
        residual=None,
    ):
        args = (x, weight, bias, running_mean, running_var, training, eps)
        if residual is not None and adds_residual:
            return fused(*args, activation, param, out, residual)
        if fused is not None and residual is None:
            return fused(*args, activation, param, out)
        if fused is not None:  # batch norm fused, then the addition and the activation
            y, mean, var = fused(*args, "identity", 0.0, out)
        else:
            y, mean, var = batch_norm_forward(*args)
        z = _acc(y) if residual is None else _acc(y) + _acc(residual)
        y = laid_out_like(activate(z, activation, param), x)
        if out is not None:
            y = out.copy_(y)
        return y, mean, var

    batch_norm_act_forward.adds_residual = adds_residual
    how = _FUSED if fused else f"{batch_norm_forward.__module__}.batch_norm_forward, then act(y)"
    batch_norm_act_forward.__doc__ = f"{_SEE}.batch_norm_act_forward`: {how}."
    return batch_norm_act_forward


batch_norm_act_forward = activated(batch_norm_forward)


def activated_backward(batch_norm_backward=None, fused=None):
    """``batch_norm_act_backward`` of a backend, the contract's signature and defaults written once
    for every backend: the in-place mode's activation checked invertible, then its ``fused``
    kernel (it takes every argument, positionally) when it has one, else z (and, in the in-place
    mode, x) recovered here, dz = dy * act'(z), and its ``batch_norm_backward`` of dz."""

    def batch_norm_act_backward(
        grad_out,
        saved,
        weight,
        bias,
        mean,
        var,
        training,
        eps,
        activation="identity",
        param=0.0,
        output_mask=(True, True, True),
        from_output=False,
    ):
        if from_output:
            require_invertible(activation)
        if fused is not None:
            args = (grad_out, saved, weight, bias, mean, var, training, eps, activation, param)
            return fused(*args, output_mask, from_output)
        x, z = _recover(saved, weight, bias, mean, var, eps, activation, param, from_output)
        dz = activation_grad(_acc(grad_out), z, activation, param)
        dx, dweight, dbias = batch_norm_backward(
            dz, x, weight, mean, var, training, eps, output_mask
        )
        return (None if dx is None else laid_out_like(dx, saved)), dweight, dbias

    how = _FUSED if fused else f"{batch_norm_backward.__module__}.batch_norm_backward of dy act'(z)"
    batch_norm_act_backward.__doc__ = f"{_SEE}.batch_norm_act_backward`: {how}."
    return batch_norm_act_backward


def _recover(saved, weight, bias, mean, var, eps, activation, param, from_output):
    """(x, z): the input and the pre-activation, from x itself or (in place) from y = act(z)."""
    sa = _acc(saved)
    scale = torch.rsqrt(var.to(sa.dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(sa.dtype)
    shift = per_channel(bias.to(sa.dtype), sa) if bias is not None else 0.0
    if from_output:
        z = invert_activation(sa, activation, param)
        return (z - shift) / per_channel(scale, sa) + per_channel(mean.to(sa.dtype), sa), z
    return sa, (sa - per_channel(mean.to(sa.dtype), sa)) * per_channel(scale, sa) + shift


batch_norm_act_backward = activated_backward(batch_norm_backward)


def layer_norm_dims(x: Tensor, normalized_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """(normalized dims, batch dims) of x, layer norm over its trailing ``normalized_shape``."""
    k = len(normalized_shape)
    return list(range(x.dim() - k, x.dim())), list(range(x.dim() - k))


def layer_norm_forward(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """See :meth:`bnlab.kernels.contract.Kernels.layer_norm_forward`."""
    xa = _acc(x)
    dims, _ = layer_norm_dims(x, normalized_shape)
    var, mean = torch.var_mean(xa, dim=dims, correction=0, keepdim=True)
    y = (xa - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(xa.dtype)
    if bias is not None:
        y = y + bias.to(xa.dtype)
    return laid_out_like(y, x), mean, var


def layer_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    mean: Tensor | None,
    var: Tensor | None,
    eps: float,
    output_mask: Sequence[bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """See :meth:`bnlab.kernels.contract.Kernels.layer_norm_backward`."""
    xa, dy = _acc(x), _acc(grad_out)
    dims, batch_dims = layer_norm_dims(x, normalized_shape)
    if mean is None:
        var, mean = torch.var_mean(xa, dim=dims, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xa - mean) * rstd
    dx = dweight = dbias = None
    if output_mask[0]:
        g = dy if weight is None else dy * weight.to(xa.dtype)
        dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        dx = laid_out_like(dx, x)
    if weight is not None and output_mask[1]:
        dweight = _sum_over(dy * xhat, batch_dims)
    if output_mask[2]:
        dbias = _sum_over(dy, batch_dims)
    return dx, dweight, dbias


def _sum_over(t: Tensor, dims: list[int]) -> Tensor:
    """Sum over ``dims``; none means none (``Tensor.sum([])`` would sum over everything).

    Never returns ``t`` itself: a kernel's outputs must not alias its inputs.
    """
    return t.sum(dims) if dims else t.clone()
