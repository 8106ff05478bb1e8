"""PyTorch's own batch-norm kernels (``aten::native_batch_norm`` and its backward) as a backend.

Automatic selection sends here what bnlab's own kernels do not do better: on the CPU, inputs whose
channels are the innermost dimension ((N, C) with many channels, channels_last) where PyTorch's
vectorized per-channel loops are already near memory speed, and small tensors, where a call's fixed
cost outweighs the kernel. Same contract as :mod:`bnlab.kernels.torch_ops`: bnlab still owns the
running statistics, the non-finite guard and the argument checks; only the arithmetic runs in ATen.
A fused activation is ATen's batch norm followed by PyTorch's activation (eager code outside
compile normally skips these functions: :func:`bnlab.functional.batch_norm_act` calls ATen's
differentiable op and the activation directly, see :func:`batch_norm_with_autograd`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import torch_ops
from .torch_ops import laid_out_like

_DTYPES = (torch.float32, torch.float64)


def supports(op: str, x: Tensor) -> bool:
    """Batch norm without a mask (plain or with a fused activation), training or eval, in
    float32/float64."""
    return (op in ("batch_norm", "batch_norm_backward", "batch_norm_eval", "batch_norm_act")
            and x.dtype in _DTYPES and x.numel() > 0)


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps, mask=None):
    """See :func:`bnlab.kernels.torch_ops.batch_norm_forward`. The batch variance comes back from
    ATen's saved 1 / sqrt(var + eps)."""
    if training:  # no running statistics here: bnlab updates them itself
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0,
                                                           eps)
        return laid_out_like(y, x), mean, (invstd.reciprocal().square() - eps).clamp_(min=0.0)
    y, _, _ = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean.to(x.dtype),
                                               running_var.to(x.dtype), False, 0.0, eps)
    empty = x.new_empty((0,))
    return laid_out_like(y, x), empty, empty.clone()


def batch_norm_with_autograd(x: Tensor, weight, bias, running_mean, running_var, training: bool,
                             momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) from one ATen call, differentiable through ATen's own autograd node, with
    the running statistics (if given, in training) updated inside the kernel:
    running <- (1 - momentum) * running + momentum * batch (unbiased variance), as torch.nn does.

    The eager CPU fast path of :func:`bnlab.functional.batch_norm` for what the registry gives this
    backend; the caller guards the running statistics against a non-finite batch."""
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, training,
                                              momentum, eps)
    return laid_out_like(y, x), mean, invstd


def batch_norm_backward(grad_out: Tensor, x: Tensor, weight, mean, var, training: bool,
                        eps: float, output_mask: Sequence[bool] = (True, True, True), mask=None):
    """See :func:`bnlab.kernels.torch_ops.batch_norm_backward`."""
    if mean is None:  # statistics recomputed from x
        var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    wanted = [output_mask[0], weight is not None and output_mask[1], output_mask[2]]
    if training:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, torch.rsqrt(var + eps), True, eps, wanted)
    else:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, eps, wanted)
    dx = None if dx is None else laid_out_like(dx, x)
    return (dx if wanted[0] else None, dw if wanted[1] else None, db if wanted[2] else None)


def batch_norm_act_forward(x, weight, bias, running_mean, running_var, training, eps,
                           activation="identity", param=0.0, out=None):
    """See :func:`bnlab.kernels.torch_ops.batch_norm_act_forward`: ATen's batch norm, then the
    activation (written into ``out`` when given: the in-place mode)."""
    y, mean, var = batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
    y = torch_ops.activate(y, activation, param)
    if out is not None:
        y = out.copy_(y)
    return y, mean, var


def batch_norm_act_backward(grad_out, saved, weight, bias, mean, var, training, eps,
                            activation="identity", param=0.0, output_mask=(True, True, True),
                            from_output=False):
    """See :func:`bnlab.kernels.torch_ops.batch_norm_act_backward`: dz = dy * act'(z) with z
    recomputed (or recovered from the output), then ATen's batch-norm backward."""
    if from_output:  # z from y needs the activation's inverse: the composite backend has it
        return torch_ops.batch_norm_act_backward(grad_out, saved, weight, bias, mean, var, training,
                                                 eps, activation, param, output_mask, from_output)
    z, _, _ = batch_norm_forward(saved, weight, bias, mean, var, False, eps)
    dz = torch_ops.activation_grad(grad_out, z, activation, param)
    return batch_norm_backward(dz, saved, weight, mean, var, training, eps, output_mask)
