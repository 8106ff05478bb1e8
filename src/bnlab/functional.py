"""The public ops: batch norm, batch norm with a fused activation, and layer norm.

Each checks its arguments (:mod:`bnlab.checks`), selects the kernel backend once
(:func:`bnlab.kernels.select_backend`), runs it through the differentiable ops of :mod:`bnlab.ops`
(or the backend's own eager path, see :class:`bnlab.kernels.contract.EagerBatchNorm`), and folds a
training batch's statistics into the running ones (:mod:`bnlab.statistics`). Under a torch.func
transform (vmap, grad, jacrev, ...) they run as torch.nn.functional's (see
:func:`bnlab.ops.transforms_active`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch.nn.functional as TF
from torch import Tensor

from . import ops
from .checks import (
    ACTIVATIONS,
    check_activation,
    check_batch_norm_args,
    check_layer_norm_args,
    check_mask,
    check_residual,
    check_untransformable,
    valid_count,
)
from .kernels import adds_residual, select_backend, select_residual_backend, selection_state
from .kernels.composite import activate, activate_in_place, values_per_channel
from .statistics import NonFiniteStatisticsError, RunningStatistics

__all__ = [
    "batch_norm",
    "batch_norm_act",
    "batch_norm_add_act",
    "layer_norm",
    "NonFiniteStatisticsError",
    "ACTIVATIONS",
    "check_activation",
]


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
        - a training batch with any non-finite statistic leaves ``running_mean``,
          ``running_var`` and ``num_batches_tracked`` untouched; on a GPU the choice is made on the
          device (no host sync), on the CPU on the host (fewer small ops, nothing to wait for).
    """
    running = RunningStatistics(running_mean, running_var, num_batches_tracked, momentum)
    check_batch_norm_args(input, weight, bias, running, training, eps)
    if ops.transforms_active():
        check_untransformable(mask=mask is not None)
        return ops.transformed_batch_norm(input, weight, bias, running, training, eps)
    count = None  # values per channel; counted only where the statistics are recorded
    if mask is not None:
        check_mask(mask, input)
        count = valid_count(mask, training)  # before the op: too few valid values raise
    kernels = select_backend(ops.batch_norm_op_name(mask, training), input, backend)
    eager = None if mask is not None else getattr(kernels.module, "eager_batch_norm", None)
    if eager is not None:
        out = eager(input, weight, bias, running, training, eps, strict)
        if out is not None:
            return out
    out, mean, var = ops.batch_norm(
        input, weight, bias, running, mask, training, eps, kernels.name, backend
    )
    if training:
        running.record(mean, var, values_per_channel(input) if count is None else count, strict)
    return out


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

    with act one of identity, relu, leaky_relu (negative slope ``activation_param``, default 0.01),
    elu (alpha ``activation_param``, default 1), silu (swish), hardswish, hardsigmoid, gelu (exact)
    or gelu_tanh (the tanh approximation), each with torch.nn.functional's definition and its
    backward's branches at the kinks (the table in :mod:`bnlab.kernels.contract`); only leaky_relu
    and elu take an ``activation_param``. The backward recomputes the pre-activation from x, so
    nothing but x is kept for it. Other arguments as :func:`batch_norm` (no mask).
    Where automatic selection finds bnlab's kernels no faster (small CPU tensors, see
    :func:`bnlab.kernels.cpu.prefers`), it runs as ATen's batch norm followed by the activation
    instead, which keeps x and one more tensor of its size (the activation's input or output) for
    the backward; the in-place mode always runs fused.

    In-place activated mode (``inplace=True``, after Rota Bulo et al., "In-Place Activated
    BatchNorm", CVPR 2018, https://arxiv.org/abs/1712.02616): y is written over ``input`` (which is
    returned), and only y is kept for the backward, which recovers the normalized input by inverting
    the activation: identity, leaky_relu with slope > 0, elu with alpha > 0 only; the others raise
    a ValueError naming these. As in that paper,
    gamma enters as |gamma| + eps so the inversion never divides by zero. ``input`` must not be
    needed by the backward of the op that produced it: conv and linear layers keep their own input,
    not their output, so ``conv -> in-place BN+act`` is the intended use.
    """
    running = RunningStatistics(running_mean, running_var, num_batches_tracked, momentum)
    check_batch_norm_args(input, weight, bias, running, training, eps)
    activation, param = check_activation(activation, activation_param, inplace)
    if ops.transforms_active():
        check_untransformable(inplace=inplace)
        return ops.transformed_batch_norm(
            input, weight, bias, running, training, eps, activation, param
        )
    op = "batch_norm_act" if training else "batch_norm_act_eval"
    kernels = select_backend(op, input, backend, activation)
    eager = None if inplace else getattr(kernels.module, "eager_batch_norm", None)
    if eager is not None:  # the in-place mode always runs fused
        out = eager(input, weight, bias, running, training, eps, strict, activation, param)
        if out is not None:
            return out
    out, mean, var = ops.batch_norm_act(
        input, weight, bias, running, training, eps, activation, param, inplace, kernels.name
    )
    if training:
        running.record(mean, var, values_per_channel(input), strict)
    return out


def batch_norm_add_act(
    input: Tensor, residual: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: str = "relu",
    activation_param: Optional[float] = None, *, num_batches_tracked: Optional[Tensor] = None,
    inplace: bool = False, strict: bool = False, backend: Optional[str] = None,
) -> Tensor:  # fmt: skip
    r""":math:`y = \mathrm{act}(\gamma (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} + \beta + r)`,
    a residual unit's end (He et al. 2016, eq. 1; section 3.4). r: the input's shape, dtype and
    device; act: identity, relu, leaky_relu (slope > 0). One pass reads x and r and writes y where
    the backend adds r in its normalizing pass (bnlab's CPU kernels, see
    :func:`bnlab.kernels.cpu.prefers`); else batch norm, ``+= r`` and act run as a block's code.
    ``inplace`` (Rota Bulo et al. 2018): y written over ``input``, only y and r kept, gamma enters
    as |gamma| + eps (identity, leaky_relu). Other arguments as :func:`batch_norm_act`."""
    running = RunningStatistics(running_mean, running_var, num_batches_tracked, momentum)
    check_batch_norm_args(input, weight, bias, running, training, eps)
    activation, param = check_residual(residual, input, activation, activation_param, inplace)
    if ops.transforms_active():
        check_untransformable(inplace=inplace)
        out = ops.transformed_batch_norm(input, weight, bias, running, training, eps)
        return activate(out + residual, activation, param)
    kernels = select_residual_backend(input, training, backend, activation, inplace)
    if not (inplace or adds_residual(kernels)):
        out = batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked=num_batches_tracked, strict=strict, backend=backend,
        )  # fmt: skip
        return activate_in_place(out.add_(residual), activation, param)
    out, mean, var = ops.batch_norm_add_act(
        input, residual, weight, bias, running, training, eps, activation, param, inplace,
        kernels.name,
    )  # fmt: skip
    if training:
        running.record(mean, var, values_per_channel(input), strict)
    return out


def eager_path(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running: RunningStatistics,
    training: bool,
    eps: float,
    activation: str = "identity",
    param: float = 0.0,
) -> Optional[Callable[..., Optional[Tensor]]]:
    """The eager path of the backend that automatic selection gives this call, specialized for
    its signature (the backend's ``eager_runner``, see :class:`bnlab.kernels.contract.EagerRunner`),
    as ``run(input, weight, bias, running, strict)``; None where that backend has none or the call
    is compiled or transformed. Raises what :func:`batch_norm_act` raises for bad arguments
    (``activation`` and ``param`` checked by the caller). A module keeps the answer under
    :func:`call_signature` and then calls it directly, as torch.nn calls ATen's op: inside a model
    the checks' frames are what made small layers slower than torch.nn's."""
    if ops.traced():
        return None
    check_batch_norm_args(input, weight, bias, running, training, eps)
    if activation == "identity":
        op = ops.batch_norm_op_name(None, training)
    else:
        op = "batch_norm_act" if training else "batch_norm_act_eval"
    runner = getattr(select_backend(op, input, None, activation).module, "eager_runner", None)
    if runner is None:
        return None
    return runner(input, weight, bias, running, training, eps, activation, param)


def call_signature(
    input: Tensor,
    training: bool,
    running: bool,
    activation: str,
    param: Optional[float],
    eps: float,
    momentum: Optional[float],
) -> tuple:
    """All that :func:`eager_path`'s answer reads of a call besides its (C,) vectors, whose
    sizes, dtypes and devices ATen's op checks again at each call: the input's shape, strides,
    dtype and device, the mode, whether running statistics are given, the activation as given,
    eps, momentum and the backend selection's state."""
    return (
        input.shape,
        input.stride(),
        input.dtype,
        input.is_cpu,
        training,
        running,
        activation,
        param,
        eps,
        momentum,
    ) + selection_state()


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
    normalized_shape = check_layer_norm_args(input, normalized_shape, weight, bias, eps)
    if ops.transforms_active():
        return TF.layer_norm(input, normalized_shape, weight, bias, eps)
    kernels = select_backend("layer_norm", input, backend)
    return ops.layer_norm(input, normalized_shape, weight, bias, eps, kernels.name)
