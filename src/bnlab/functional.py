"""The public ops: batch norm and layer norm with hand-derived gradients.

Each op is a ``torch.library`` custom op (``bnlab::batch_norm``, ``bnlab::layer_norm``) with a fake
(meta) kernel and a registered backward that is itself a custom op (``bnlab::batch_norm_backward``,
``bnlab::layer_norm_backward``), so autograd, ``torch.compile(fullgraph=True)`` and ``torch.export``
each see one op per direction. The kernels come from the backend registry (:mod:`bnlab.kernels`).

Second derivatives (gradient penalties, ``gradgradcheck``): when the backward itself is being
differentiated, it runs the composite backward of :mod:`bnlab.kernels.torch_ops` in autograd-visible
PyTorch ops, with the batch statistics recomputed from the input so that their dependence on it is
kept.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .kernels import native, select_backend, torch_ops
from .kernels.torch_ops import accumulation_dtype, values_per_channel

__all__ = ["batch_norm", "batch_norm_act", "layer_norm", "NonFiniteStatisticsError", "ACTIVATIONS"]


class NonFiniteStatisticsError(FloatingPointError):
    """A training batch produced non-finite statistics (raised only in strict mode)."""


# --------------------------------------------------------------------------------------------
# bnlab::batch_norm
# --------------------------------------------------------------------------------------------


def _batch_norm_kernel(input, weight, bias, running_mean, running_var, mask, training, eps,
                       backend):
    kernels = select_backend(_op_name(mask, training), input, backend)
    return kernels.batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, eps, mask
    )


@torch.library.custom_op("bnlab::batch_norm", mutates_args=())
def _batch_norm_op(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mask: Optional[Tensor],
    training: bool,
    eps: float,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_kernel(input, weight, bias, running_mean, running_var, mask, training, eps,
                              backend)


def _op_name(mask: Optional[Tensor], training: bool) -> str:
    """The registry's name for what a backend must support: masked statistics are an extra, and
    eval (no statistics: one streaming pass) is told apart so the fastest backend can take it."""
    if not training:
        return "batch_norm_eval"
    return "batch_norm_masked" if mask is not None else "batch_norm"


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, mask, training, eps, backend):
    stats = input.new_empty((input.shape[1] if training else 0,), dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(input), stats, torch.empty_like(stats)


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mask: Optional[Tensor],
    training: bool,
    eps: float,
    output_mask: list[bool],
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_backward_kernel(grad_out, input, weight, mean, var, mask, training, eps,
                                       output_mask, backend)


def _batch_norm_backward_kernel(grad_out, input, weight, mean, var, mask, training, eps,
                                output_mask, backend):
    op = _op_name(mask, training)
    # a plain training backward is its own op: the fastest backend for it may not be the forward's
    kernels = select_backend("batch_norm_backward" if op == "batch_norm" else op, input, backend)
    grads = kernels.batch_norm_backward(
        grad_out, input, weight, mean, var, training, eps, output_mask, mask
    )
    return _absent_as_empty(grads, input)


@_batch_norm_backward_op.register_fake
def _(grad_out, input, weight, mean, var, mask, training, eps, output_mask, backend):
    return _fake_grads(input, (input.shape[1],), weight, output_mask)


def _absent_as_empty(grads, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    empty = input.new_empty((0,), dtype=accumulation_dtype(input.dtype))
    return tuple(empty.clone() if g is None else g for g in grads)


def _fake_grads(input: Tensor, param_shape, weight, output_mask):
    acc = accumulation_dtype(input.dtype)
    dx = torch.empty_like(input) if output_mask[0] else input.new_empty((0,), dtype=acc)
    dw_shape = param_shape if weight is not None and output_mask[1] else (0,)
    db_shape = param_shape if output_mask[2] else (0,)
    return dx, input.new_empty(dw_shape, dtype=acc), input.new_empty(db_shape, dtype=acc)


def _setup_batch_norm(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, mask, training, eps, backend = inputs
    _, mean, var = output
    if not training:  # eval: the running statistics are the (constant) statistics
        mean, var = running_mean, running_var
    ctx.save_for_backward(input, weight, mean, var, mask)
    ctx.training, ctx.eps, ctx.backend = training, eps, backend
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_batch_norm(ctx, grad_out, _grad_mean, _grad_var,
                         backward_kernel=_batch_norm_backward_op):
    input, weight, mean, var, mask = ctx.saved_tensors
    needed = list(ctx.needs_input_grad[:3])
    if _differentiating_backward(grad_out, input, weight):
        grads = torch_ops.batch_norm_backward(
            grad_out, input, weight, None if ctx.training else mean,
            None if ctx.training else var, ctx.training, ctx.eps, needed, mask,
        )
    else:
        grads = backward_kernel(
            grad_out, input, weight, mean, var, mask, ctx.training, ctx.eps, needed, ctx.backend
        )
    return (*_cast_grads(grads, needed, ctx.param_dtypes), None, None, None, None, None, None)


def _differentiating_backward(*tensors) -> bool:
    """True while autograd records the backward itself (create_graph=True: double backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast_grads(grads, mask, param_dtypes):
    dx, dw, db = (g if needed else None for g, needed in zip(grads, mask))
    dw = None if dw is None else dw.to(param_dtypes[0])
    db = None if db is None else db.to(param_dtypes[1])
    return dx, dw, db


_batch_norm_op.register_autograd(_backward_batch_norm, setup_context=_setup_batch_norm)


class _EagerBatchNorm(torch.autograd.Function):
    """The same op for eager mode, without the custom-op layer: torch.library's autograd wrapper
    costs ~0.3 ms a call on a 51 MB input (measured), 10% of a memory-bound batch norm. Under
    torch.compile / torch.export the custom op runs instead (one node, fake kernels)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _batch_norm_kernel(*inputs)
        _setup_batch_norm(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        return _backward_batch_norm(ctx, grad_out, grad_mean, grad_var,
                                    backward_kernel=_batch_norm_backward_kernel)


def _batch_norm_dispatch(*inputs):
    """(y, mean, var): the custom op when compiling or exporting, the eager Function otherwise."""
    if torch.compiler.is_compiling():
        return _batch_norm_op(*inputs)
    return _EagerBatchNorm.apply(*inputs)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    strict: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015, https://arxiv.org/abs/1502.03167), Algorithm 1.

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta

    with per-channel statistics over the batch and every spatial position (dims 0, 2, 3, ...).
    Same arguments as :func:`torch.nn.functional.batch_norm`, plus the keyword-only ones below.

    Args:
        input: (N, C, *) with any number of trailing dims, contiguous or channels_last.
        running_mean, running_var: (C,) buffers, updated in place in training; required in eval.
        weight, bias: optional (C,) gamma and beta.
        training: normalize with batch statistics (True) or the running ones (False).
        momentum: running = (1 - momentum) * running + momentum * batch; None gives the cumulative
            average (factor 1 / num_batches_tracked) and needs ``num_batches_tracked``.
        eps: added to the variance, > 0.
        num_batches_tracked: optional scalar integer buffer, incremented per finite training batch.
        mask: optional bool (N, *spatial) marking valid positions (e.g. not padding): in training
            the statistics, and the running statistics' count m, cover those positions only; every
            position is normalized with them. Ignored in eval. Gradients are those of this
            function: padding positions' x gets only the direct term (it did not enter the
            statistics), while every output's dy reaches the statistics.
        strict: raise :class:`NonFiniteStatisticsError` naming the channels whose batch statistics
            are not finite (this reads the statistics on the host; eager mode only).
        backend: kernel backend name (see :mod:`bnlab.kernels`); default automatic.

    Details:
        - normalization uses the biased batch variance; ``running_var`` tracks the unbiased one
          (times m / (m - 1), m = N * prod(spatial)), as PyTorch does;
        - float16/bfloat16 inputs are computed in float32, with float32 statistics; weight, bias and
          running statistics may be float32 for them (mixed precision);
        - a training batch with any non-finite statistic leaves ``running_mean``, ``running_var`` and
          ``num_batches_tracked`` untouched; on a GPU the choice is made on the device (no host
          sync), on the CPU on the host (fewer small ops, nothing to wait for).
    """
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                           num_batches_tracked)
    if mask is None and _runs_in_aten(input, training, backend):
        return _batch_norm_in_aten(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, num_batches_tracked, strict)
    count = values_per_channel(input)
    if mask is not None:
        count = _check_mask(mask, input, training)
    out, mean, var = _batch_norm_dispatch(
        input, weight, bias, running_mean, running_var, mask, training, eps, backend
    )
    if training:
        record_batch_statistics(running_mean, running_var, num_batches_tracked, mean, var, count,
                                momentum, strict)
    return out


def _runs_in_aten(input: Tensor, training: bool, backend: Optional[str],
                  op: Optional[str] = None) -> bool:
    """Eager CPU batch norm that the registry gives to the ``native`` backend (ATen's kernels) runs
    as ATen's own differentiable op instead of through bnlab's Function: the same kernels both ways,
    without the wrapper, the variance recovered from ATen's 1/sqrt(var + eps) and a separate
    running-statistics update, which cost 10-20% of a 0.3-1 ms batch norm (benchmarks/bn_speed.py).
    ``op`` defaults to plain batch norm's registry name.
    """
    return (input.device.type == "cpu" and not torch.compiler.is_compiling()
            and select_backend(op or _op_name(None, training), input, backend) is native)


def _batch_norm_in_aten(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        num_batches_tracked, strict) -> Tensor:
    """:func:`batch_norm` as one differentiable ATen call that also updates the running statistics
    (inside its kernel, as torch.nn's does), with bnlab's guard kept: if the batch's statistics are
    not finite, the running statistics are put back and the batch is not counted. CPU only: the
    test reads the statistics on the host.

    The put-back writes through NumPy, like ATen's own update, without bumping the buffers' version
    counters: ATen's autograd node keeps the running statistics (for an eval-mode backward), and a
    counted in-place write would make that backward raise.
    """
    if not training:
        return native.batch_norm_with_autograd(input, weight, bias, running_mean, running_var,
                                               False, 0.0, eps)[0]
    tracked = running_mean is not None
    factor = 0.0
    if tracked:
        before = running_mean.detach().numpy().copy(), running_var.detach().numpy().copy()
        factor = momentum if momentum is not None else 1.0 / (int(num_batches_tracked) + 1)
    out, mean, invstd = native.batch_norm_with_autograd(input, weight, bias, running_mean,
                                                        running_var, True, factor, eps)
    # invstd = 1 / sqrt(var + eps) is NaN where the mean or the variance is NaN or an infinite
    # input made them so, and 0 for an infinite variance: all statistics are finite iff its
    # minimum is > 0 (a NaN minimum compares False)
    finite = bool(invstd.detach().numpy().min() > 0)
    if tracked and finite and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    elif tracked and not finite:
        running_mean.detach().numpy()[:] = before[0]
        running_var.detach().numpy()[:] = before[1]
    if strict and not finite and input.numel() > 0:  # an empty batch has no statistics to check
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.reciprocal(np.square(invstd.detach().numpy())) - eps
        _raise_if_not_finite(mean.detach(), torch.from_numpy(var))
    return out


# --------------------------------------------------------------------------------------------
# batch norm + activation (fused), and the in-place activated mode
# --------------------------------------------------------------------------------------------

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu")
_DEFAULT_PARAM = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0}
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")  # what the in-place mode can undo


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x)) with one hand-derived backward; in place, only the output is kept."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, eps, activation,
                param, inplace, backend):
        kernels = select_backend("batch_norm_act", input, backend)
        scale = weight
        if inplace and weight is not None:
            # Recovering x from y divides by gamma: keep it away from zero (Rota Bulo et al.).
            scale = weight.abs() + eps
        y, mean, var = kernels.batch_norm_act_forward(
            input, scale, bias, running_mean, running_var, training, eps, activation, param,
            out=input if inplace else None,
        )
        if inplace:
            ctx.mark_dirty(input)
        ctx.mark_non_differentiable(mean, var)
        stats = (mean, var) if training else (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(y if inplace else input, weight, scale, bias, *stats)
        ctx.config = (training, eps, activation, param, inplace, backend)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        saved, weight, scale, bias, mean, var = ctx.saved_tensors
        training, eps, activation, param, inplace, backend = ctx.config
        needed = list(ctx.needs_input_grad[:3])
        kernels = select_backend("batch_norm_act", saved, backend)
        dx, dscale, dbias = kernels.batch_norm_act_backward(
            grad_out, saved, scale, bias, mean, var, training, eps, activation, param, needed,
            from_output=inplace,
        )
        dweight = dscale
        if inplace and dscale is not None:
            dweight = dscale * torch.sign(weight).to(dscale.dtype)  # d(|w| + eps)/dw
        dx, dweight, dbias = _cast_grads(
            (dx, dweight, dbias), needed,
            (None if weight is None else weight.dtype, None if bias is None else bias.dtype),
        )
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def check_activation(activation: str, param: Optional[float], inplace: bool) -> tuple[str, float]:
    """Validate an activation name and its parameter; returns (name, parameter with its default)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if param is None:
        param = _DEFAULT_PARAM[activation]
    param = float(param)
    if inplace and activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"the in-place mode recovers its input by inverting the activation; {activation!r} is "
            f"not invertible, expected one of {INVERTIBLE_ACTIVATIONS}"
        )
    if inplace and activation in ("leaky_relu", "elu") and not param > 0:
        raise ValueError(
            f"the in-place mode needs an invertible {activation}: its parameter must be > 0, "
            f"got {param}"
        )
    if activation == "elu" and param < 0:
        raise ValueError(f"elu needs alpha >= 0, got {param}")
    return activation, param


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: Optional[float] = None,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    inplace: bool = False,
    strict: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Batch normalization followed by an activation, in one pass over memory each way.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta\right)

    with act one of identity, relu, leaky_relu (negative slope ``activation_param``, default 0.01)
    or elu (alpha ``activation_param``, default 1). The backward recomputes the pre-activation from
    x, so nothing but x is kept for it. Other arguments as :func:`batch_norm` (no mask).
    Where automatic selection finds bnlab's kernels no faster (small CPU tensors, see
    :func:`bnlab.kernels.cpu.prefers`), it runs as ATen's batch norm followed by the activation
    instead, which keeps x and one more tensor of its size (the activation's input or output) for
    the backward; the in-place mode always runs fused.

    In-place activated mode (``inplace=True``, after Rota Bulo et al., "In-Place Activated
    BatchNorm", CVPR 2018, https://arxiv.org/abs/1712.02616): y is written over ``input`` (which is
    returned), and only y is kept for the backward, which recovers the normalized input by inverting
    the activation (identity, leaky_relu with slope > 0, elu with alpha > 0). As in that paper,
    gamma enters as |gamma| + eps so the inversion never divides by zero. ``input`` must not be
    needed by the backward of the op that produced it: conv and linear layers keep their own input,
    not their output, so ``conv -> in-place BN+act`` is the intended use.
    """
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps,
                           num_batches_tracked)
    activation, param = check_activation(activation, activation_param, inplace)
    if not inplace and _runs_in_aten(input, training, backend, "batch_norm_act"):
        # small tensors: ATen's differentiable batch norm, then PyTorch's activation (autograd
        # then keeps x and the activation's input or output, where the fused op keeps x only:
        # one more small tensor)
        out = _batch_norm_in_aten(input, running_mean, running_var, weight, bias, training,
                                  momentum, eps, num_batches_tracked, strict)
        return torch_ops.activate(out, activation, param)
    out, mean, var = _BatchNormAct.apply(
        input, weight, bias, running_mean, running_var, training, eps, activation, param, inplace,
        backend,
    )
    if training:
        record_batch_statistics(running_mean, running_var, num_batches_tracked, mean, var,
                                values_per_channel(input), momentum, strict)
    return out


def record_batch_statistics(running_mean, running_var, num_batches_tracked, mean, var, count,
                            momentum, strict: bool) -> None:
    """After a training batch: fold its statistics into the running ones (if tracked; skipped for a
    non-finite batch), and in ``strict`` mode raise on non-finite statistics. An empty batch has
    no statistics: nothing is recorded, nothing raised, ``num_batches_tracked`` is not counted."""
    if isinstance(count, int) and count == 0:
        return
    if running_mean is not None:
        _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                              momentum)
    if strict:
        _raise_if_not_finite(mean, var)


@torch.no_grad()
def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, m, momentum):
    """EMA (or cumulative average) of the batch statistics, skipped whole for a non-finite batch.

    running <- running + w * (batch - running), w = momentum (or 1 / num_batches_tracked), and w = 0
    for a non-finite batch, whose statistics are zeroed first so they cannot leak in. Decided on
    the device: no host synchronisation (on the CPU, where a host decision is free, in fewer ops).
    """
    if running_mean.device.type == "cpu" and not torch.compiler.is_compiling():
        _update_running_stats_on_host(running_mean, running_var, num_batches_tracked, mean, var, m,
                                      momentum)
        return
    finite = torch.isfinite(mean + var).all()  # inf + NaN, NaN + x: any non-finite shows
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite)
    for running, batch in ((running_mean, mean), (running_var, var * (m / (m - 1)))):
        weight = finite.to(running.dtype)  # in the buffer's precision: momentum 0.1 is not a float32
        weight = weight * momentum if momentum is not None else weight / num_batches_tracked.clamp(min=1)
        running.lerp_(batch.nan_to_num(0.0, 0.0, 0.0).to(running.dtype), weight)


def _update_running_stats_on_host(running_mean, running_var, num_batches_tracked, mean, var, m,
                                  momentum):
    """:func:`_update_running_stats` with the finiteness test and the weight on the host: half
    the small ops, which is most of a small batch norm's cost on the CPU."""
    if not _all_finite_on_host(mean, var):
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    weight = momentum if momentum is not None else 1.0 / int(num_batches_tracked)
    running_mean.lerp_(mean.to(running_mean.dtype), weight)
    running_var.lerp_((var * (m / (m - 1))).to(running_var.dtype), weight)


def _all_finite_on_host(*tensors: Tensor) -> bool:
    """Whether every value is finite, decided with NumPy where it can (a fifth of torch.isfinite's
    cost on a small CPU vector)."""
    for t in tensors:
        if t.dtype in (torch.float32, torch.float64):
            finite = np.isfinite(t.detach().numpy()).all()
        else:
            finite = torch.isfinite(t).all()
        if not finite:
            return False
    return True


def _raise_if_not_finite(mean: Tensor, var: Tensor) -> None:
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    if bool(bad.any()):
        channels = bad.nonzero().flatten().tolist()
        shown = channels[:20] + (["..."] if len(channels) > 20 else [])
        raise NonFiniteStatisticsError(
            f"batch statistics are not finite in {len(channels)} of {mean.numel()} channels "
            f"(channels {shown}); running statistics were left unchanged"
        )


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_input(name: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor input, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(
            f"{name} expects a floating-point input (float64, float32, float16 or bfloat16), "
            f"got {input.dtype}"
        )


def _check_vector(name: str, t, shape: tuple, input: Tensor, what: str) -> None:
    """A parameter or statistic: a tensor of ``shape`` on input's device, of a compatible dtype."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, expected {shape} ({what}; input shape "
            f"{tuple(input.shape)})"
        )
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device}, expected the input's device {input.device}")
    allowed = {input.dtype, accumulation_dtype(input.dtype)}
    if t.dtype not in allowed:
        raise TypeError(
            f"{name} has dtype {t.dtype}, expected {' or '.join(sorted(map(str, allowed)))} "
            f"for a {input.dtype} input"
        )


def _check_mask(mask, input: Tensor, training: bool):
    """A bool (N, *spatial) mask on input's device; returns its count of valid positions."""
    expected = (input.shape[0], *input.shape[2:])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expected:
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__)
        raise ValueError(
            f"mask must be a bool tensor of shape (N, *spatial) = {expected} for an input of shape "
            f"{tuple(input.shape)}, got {got}"
        )
    if mask.device != input.device:
        raise ValueError(f"mask is on {mask.device}, expected the input's device {input.device}")
    count = mask.sum()
    if training and not torch.compiler.is_compiling() and int(count) < 2:  # host sync: masks only
        raise ValueError(
            f"Expected more than 1 valid value per channel when training, the mask has {int(count)}"
        )
    return count


def _vectors_fit(input: Tensor, vectors) -> bool:
    """The common case of :func:`_check_vector` for every (C,) vector at once, in a few
    microseconds less (it runs on every call of every layer)."""
    c, device = input.shape[1], input.device
    allowed = (input.dtype, accumulation_dtype(input.dtype))
    return all(t is None or (isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == c
                             and t.dtype in allowed and t.device == device)
               for _, t in vectors)


def _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, num_batches_tracked) -> None:
    _check_input("batch_norm", input)
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of rank >= 2 shaped (N, C, *) with channels on dim 1, "
            f"got shape {tuple(input.shape)}"
        )
    vectors = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
               ("running_var", running_var))
    if not _vectors_fit(input, vectors):  # then say which one does not, and why
        channels = (input.shape[1],)
        what = f"one value per channel, C = {input.shape[1]}"
        for name, t in vectors:
            _check_vector(name, t, channels, input, what)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    if training and values_per_channel(input) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if num_batches_tracked is not None and (
        num_batches_tracked.numel() != 1 or num_batches_tracked.dtype.is_floating_point
    ):
        raise ValueError(
            "num_batches_tracked must be a one-element integer tensor, got "
            f"shape {tuple(num_batches_tracked.shape)} dtype {num_batches_tracked.dtype}"
        )


# --------------------------------------------------------------------------------------------
# bnlab::layer_norm
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("bnlab::layer_norm", mutates_args=())
def _layer_norm_op(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = select_backend("layer_norm", input, backend)
    return kernels.layer_norm_forward(input, normalized_shape, weight, bias, eps)


@_layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps, backend):
    k = len(normalized_shape)
    stat_shape = (*input.shape[: input.dim() - k], *([1] * k))
    stats = input.new_empty(stat_shape, dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(input), stats, torch.empty_like(stats)


@torch.library.custom_op("bnlab::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    output_mask: list[bool],
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = select_backend("layer_norm", input, backend)
    grads = kernels.layer_norm_backward(
        grad_out, input, normalized_shape, weight, mean, rstd, eps, output_mask
    )
    return _absent_as_empty(grads, input)


@_layer_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, weight, mean, rstd, eps, output_mask, backend):
    return _fake_grads(input, tuple(normalized_shape), weight, output_mask)


def _setup_layer_norm(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, weight, mean, rstd)
    ctx.normalized_shape, ctx.eps, ctx.backend = list(normalized_shape), eps, backend
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward_layer_norm(ctx, grad_out, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[2], needs[3]]
    if _differentiating_backward(grad_out, input, weight):
        grads = torch_ops.layer_norm_backward(
            grad_out, input, ctx.normalized_shape, weight, None, None, ctx.eps, mask
        )
    else:
        grads = _layer_norm_backward_op(
            grad_out, input, ctx.normalized_shape, weight, mean, rstd, ctx.eps, mask, ctx.backend
        )
    dx, dw, db = _cast_grads(grads, mask, ctx.param_dtypes)
    return dx, None, dw, db, None, None


_layer_norm_op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton 2016, https://arxiv.org/abs/1607.06450).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with statistics over the trailing ``normalized_shape`` dims of each example: the same in
    training and inference, and fine at batch size 1. Same arguments as
    :func:`torch.nn.functional.layer_norm`.

    Details: biased variance; float16/bfloat16 computed in float32.
    """
    _check_input("layer_norm", input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(s) for s in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise ValueError(
            f"layer_norm normalizes over the trailing dims normalized_shape={list(normalized_shape)}, "
            f"but the input has shape {tuple(input.shape)}"
        )
    what = "normalized_shape"
    _check_vector("weight", weight, normalized_shape, input, what)
    _check_vector("bias", bias, normalized_shape, input, what)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    out, _, _ = _layer_norm_op(input, list(normalized_shape), weight, bias, eps, backend)
    return out
