"""PyTorch's own batch-norm kernels (``aten::native_batch_norm`` and its backward) as a backend.

Automatic selection sends here what bnlab's own kernels do not do better: on the CPU, inputs whose
channels are the innermost dimension ((N, C) with many channels, channels_last) where PyTorch's
vectorized per-channel loops are already near memory speed. Same contract as
:mod:`bnlab.kernels.torch_ops`: bnlab still owns the running statistics, the non-finite guard and
the argument checks; only the arithmetic runs in ATen.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .torch_ops import laid_out_like

_DTYPES = (torch.float32, torch.float64)


def supports(op: str, x: Tensor) -> bool:
    """Plain batch norm (no mask, no fused activation), training or eval, in float32/float64."""
    return (op in ("batch_norm", "batch_norm_backward", "batch_norm_eval") and x.dtype in _DTYPES
            and x.numel() > 0)


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
