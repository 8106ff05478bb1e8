"""PyTorch's own batch-norm kernels (``aten::native_batch_norm`` and its backward) as a backend.

Automatic selection sends here what bnlab's own kernels do not do better: on the CPU, inputs whose
channels are the innermost dimension ((N, C) with many channels, channels_last) where PyTorch's
vectorized per-channel loops are already near memory speed, small tensors, where a call's fixed
cost outweighs the kernel, and float16/bfloat16 inputs (ATen's mixed-precision kernel, float32
statistics: what torch.nn runs under autocast). Same contract as :mod:`bnlab.kernels.composite`:
bnlab still owns the running statistics, the non-finite guard and the argument checks; only the
arithmetic runs in ATen.
A fused activation is ATen's batch norm followed by PyTorch's activation. Eager CPU calls skip
these kernel functions: :func:`eager_batch_norm` runs the whole op as ATen's differentiable op.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..statistics import (
    RunningStatistics,
    may_defer_eagerly,
    raise_if_not_finite,
    updates_deferred,
    variance_from_invstd,
)
from . import composite
from .composite import is_dense, laid_out_like
from .contract import UNMASKED_BATCH_NORM_OPS

FULL_PRECISION = (torch.float32, torch.float64)  # ATen's kernels in the input's dtype
_OPS = UNMASKED_BATCH_NORM_OPS
_HALF = (torch.float16, torch.bfloat16)


def supports(op: str, x: Tensor) -> bool:
    """Batch norm without a mask (plain or with a fused activation), training or eval, in
    float32/float64, and float16/bfloat16 through ATen's mixed-precision kernel (float32
    statistics and parameters, as torch.nn runs under autocast)."""
    return op in _OPS and (x.dtype in FULL_PRECISION or x.dtype in _HALF) and x.numel() > 0


def _statistics_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _mixed_params(x: Tensor, weight, bias):
    """gamma and beta as ATen's kernel takes them: for half inputs float32 (ones and zeros where
    absent), which selects its mixed-precision kernel: float32 arithmetic and statistics, one
    rounding of the output to the input's type."""
    if x.dtype not in _HALF:
        return weight, bias
    channels = x.shape[1]
    weight = x.new_ones(channels, dtype=torch.float32) if weight is None else weight.float()
    bias = x.new_zeros(channels, dtype=torch.float32) if bias is None else bias.float()
    return weight, bias


def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps, mask=None):
    """See :meth:`bnlab.kernels.contract.Kernels.batch_norm_forward`. The batch variance comes back
    from ATen's saved 1 / sqrt(var + eps)."""
    weight, bias = _mixed_params(x, weight, bias)
    if training:  # no running statistics here: bnlab updates them itself
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, None, None, True, 0.0, eps
        )
        return laid_out_like(y, x), mean, variance_from_invstd(invstd, eps)
    dtype = _statistics_dtype(x)
    y, _, _ = torch.ops.aten.native_batch_norm(
        x, weight, bias, running_mean.to(dtype), running_var.to(dtype), False, 0.0, eps
    )
    empty = x.new_empty((0,))
    return laid_out_like(y, x), empty, empty.clone()


def eager_batch_norm(
    input, weight, bias, running, training, eps, strict, activation="identity", param=0.0
) -> Optional[Tensor]:
    """:class:`bnlab.kernels.contract.EagerBatchNorm`: the whole eager CPU batch norm (then the
    activation) as ATen's own differentiable op, which also updates the running statistics inside
    its kernel (as torch.nn's does), with bnlab's guard kept: if the batch's statistics are not
    finite, the running statistics are put back and the batch is not counted. None for a call
    this leaves to bnlab's Function over the kernels (not on the CPU, being compiled, or a half
    input without float32 parameters).

    Why: the same kernels both ways, without bnlab's wrapper, the variance recovered from ATen's
    1 / sqrt(var + eps) and a separate running-statistics update, which cost 10-20% of a
    0.3-1 ms batch norm (benchmarks/bn_speed.py). With an activation, autograd keeps x and the
    activation's input or output (the fused op keeps x only: one more small tensor).

    Half inputs with float32 gamma, beta and running statistics (a float32 model under CPU
    autocast) run ATen's mixed-precision kernels both ways, exactly as torch.nn does: its backward
    keeps half intermediates (dx within a few half ulps of the float32 result, not one rounding);
    other half inputs take the kernels' path, whose backward computes in float32.

    The guard costs no pass over the data: the running statistics (C values each) are copied
    before the update and ATen's C values of 1 / sqrt(var + eps) are tested after it. The put-back
    writes through NumPy, like ATen's own update, without bumping the buffers' version counters:
    ATen's autograd node keeps the running statistics (for an eval-mode backward), and a counted
    in-place write would make that backward raise.
    """
    if not input.is_cpu or torch.compiler.is_compiling():
        return None
    if input.dtype in _HALF and not _ready_for_mixed(weight, bias, running):
        return None
    running_mean, running_var = running.mean, running.var
    if not training:
        return eval_batch_norm(
            input, weight, bias, running_mean, running_var, eps, activation, param
        )
    if running_mean is None:
        y, mean, invstd = _checked_batch_norm(input, weight, bias, None, None, 0.0, eps)
        if strict:
            _raise_if_not_finite(input, mean, invstd, eps)
        return _laid_out_and_activated(y, input, activation, param)
    if updates_deferred(running_mean):
        return _deferred_batch_norm(input, weight, bias, running, eps, strict, activation, param)
    return _guarded_batch_norm(
        input, weight, bias, running, eps, strict, activation, param, _Snapshot()
    )


def _guarded_batch_norm(input, weight, bias, running, eps, strict, activation, param, snapshot):
    """ATen's training call updating the running statistics in its kernel, the guard around it:
    their values are copied into ``snapshot`` first and put back if ATen's C values of
    1 / sqrt(var + eps) show a non-finite batch, which is then not counted."""
    running_mean, running_var = running.mean, running.var
    num_batches_tracked, momentum = running.num_batches_tracked, running.momentum
    snapshot.take(running_mean, running_var)
    factor = momentum if momentum is not None else 1.0 / (int(num_batches_tracked) + 1)
    y, mean, invstd = _checked_batch_norm(
        input, weight, bias, running_mean, running_var, factor, eps
    )
    if _finite(invstd):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    else:
        snapshot.put_back(running_mean, running_var)
        if strict:
            _raise_if_not_finite(input, mean, invstd, eps)
    return _laid_out_and_activated(y, input, activation, param)


class _Snapshot:
    """The running statistics' values before ATen's update, for the guard to put back: one
    ``torch.stack`` into a (2, C) tensor kept across the calls. Inside a model each small op in
    front of ATen's costs more than alone; in paired rounds of regnetx_002's training step at
    64 px this measured no dearer than two NumPy copies or two clones (the guard, any of them:
    2-3% of the step), and it is one op with no views to keep valid. The put-back writes
    through NumPy, like ATen's own update, without bumping the buffers' version counters: ATen's
    autograd node keeps the running statistics (for an eval-mode backward), and a counted
    in-place write would make that backward raise."""

    def __init__(self) -> None:
        self._saved: Optional[Tensor] = None

    def take(self, mean: Tensor, var: Tensor) -> None:
        saved = self._saved
        if saved is None or saved.shape[1] != mean.shape[0] or saved.dtype != mean.dtype:
            saved = self._saved = mean.new_empty((2, mean.shape[0]))
        torch.stack((mean, var), out=saved)  # raises if they no longer match: see the callers

    def put_back(self, mean: Tensor, var: Tensor) -> None:
        saved = self._saved.numpy()
        mean.detach().numpy()[:] = saved[0]
        var.detach().numpy()[:] = saved[1]


def eval_batch_norm(
    input, weight, bias, running_mean, running_var, eps, activation="identity", param=0.0
) -> Tensor:
    """act(batch_norm(input)) with the running statistics, as ATen's differentiable op followed
    by the activation (over ATen's fresh output where it can: see
    :func:`bnlab.kernels.composite.activate_fresh`). ``aten::batch_norm``, the op torch.nn calls,
    whose own checks (each vector's size, dtype and device against the input's) raise a
    RuntimeError; ``native_batch_norm`` reads C values of any vector it is given."""
    y = torch.batch_norm(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        False,
        0.0,
        eps,
        torch.backends.cudnn.enabled,
    )
    return _laid_out_and_activated(y, input, activation, param)


def eager_runner(
    input, weight, bias, running: RunningStatistics, training, eps, activation="identity", param=0.0
) -> Optional[Callable[..., Optional[Tensor]]]:
    """:class:`bnlab.kernels.contract.EagerRunner`: :func:`eager_batch_norm` for the calls with
    this one's signature, as ``run(input, weight, bias, running, strict)``. The common eval call,
    a contiguous or channels_last(_3d) input, is ATen's op alone (then the activation, in place
    where it can), as torch.nn makes it: inside a model each frame in front of it costs
    (hrnet_w18_small's 91 batch norms: 0.96-0.99x torch.nn's eval through
    :func:`eager_batch_norm`). None where that declines."""
    if not input.is_cpu or (input.dtype in _HALF and not _ready_for_mixed(weight, bias, running)):
        return None
    if not training and is_dense(input):  # ATen's output comes in the input's layout

        def run(input, weight, bias, running, strict):
            y = torch.batch_norm(
                input, weight, bias, running.mean, running.var, False, 0.0, eps, False
            )
            return y if activation == "identity" else composite.activate_fresh(y, activation, param)

        return run

    if training and running.mean is not None and input.dtype in FULL_PRECISION:
        return _training_runner(eps, activation, param)

    def run(input, weight, bias, running, strict):
        return eager_batch_norm(
            input, weight, bias, running, training, eps, strict, activation, param
        )

    return run


def _training_runner(eps, activation, param):
    """The training call that updates running statistics: :func:`eager_batch_norm`'s guarded ATen
    call with one :class:`_Snapshot` kept across the calls (a deferred update, or statistics no
    longer tracked, takes :func:`eager_batch_norm` whole)."""
    snapshot = _Snapshot()

    def run(input, weight, bias, running, strict):
        # a layer's eager path only (it tests for compilation before): see may_defer_eagerly
        if running.mean is None or may_defer_eagerly():
            return eager_batch_norm(
                input, weight, bias, running, True, eps, strict, activation, param
            )
        return _guarded_batch_norm(
            input, weight, bias, running, eps, strict, activation, param, snapshot
        )

    return run


def _checked_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps):
    """ATen's training batch norm as ``torch.batch_norm`` calls it, (y, batch mean, invstd):
    ``_batch_norm_impl_index`` checks each vector's size, dtype and device against the input's
    and raises a RuntimeError (``native_batch_norm`` reads and writes C values of whatever it is
    given), then runs ``native_batch_norm`` on the CPU, under the same autograd node."""
    out = torch._batch_norm_impl_index(
        input, weight, bias, running_mean, running_var, True, momentum, eps, False
    )
    return out[0], out[1], out[2]


def _laid_out_and_activated(y: Tensor, x: Tensor, activation: str, param: float) -> Tensor:
    """ATen's fresh output laid out like x, then activated (in place where it can: see
    :func:`bnlab.kernels.composite.activate_fresh`). The common case, a dense y in x's layout and
    no activation, returns at once: this runs on every call of every layer."""
    if y.stride() != x.stride() or y.dtype != x.dtype:
        y = laid_out_like(y, x)
    return y if activation == "identity" else composite.activate_fresh(y, activation, param)


def _finite(invstd: Tensor) -> bool:
    """Whether every statistic behind ATen's invstd = 1 / sqrt(var + eps) is finite: invstd is
    NaN where the mean or the variance is NaN or an infinite input made them so, and 0 for an
    infinite variance, so all are finite iff its minimum is > 0 (a NaN minimum compares False).
    An empty batch (no channels' values) counts as finite.

    Torch's min and one scalar read, not NumPy's: inside a model, between convolutions, NumPy's
    bridge and reduction cost several times what they do alone (ghostnet_100's forward at 64 px:
    the guard by torch ops took about half the time the NumPy one did, one-off paired runs)."""
    return invstd.numel() == 0 or invstd.detach().min().item() > 0


def _raise_if_not_finite(input: Tensor, mean: Tensor, invstd: Tensor, eps: float) -> None:
    if input.numel() == 0:  # an empty batch has no statistics to check
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.reciprocal(np.square(invstd.detach().numpy())) - eps
    raise_if_not_finite(mean.detach(), torch.from_numpy(var))


def _ready_for_mixed(weight, bias, running: RunningStatistics) -> bool:
    """Whether ATen's mixed-precision kernel takes these as they are (float32 gamma, and float32
    beta and running statistics where present), returning float32 statistics: a float32 model
    under autocast."""
    present = [t for t in (bias, running.mean, running.var) if t is not None]
    return weight is not None and all(t.dtype == torch.float32 for t in (weight, *present))


def _deferred_batch_norm(input, weight, bias, running, eps, strict, activation, param) -> Tensor:
    """:func:`eager_batch_norm` whose update must wait (gradient accumulation, or a checkpointed
    forward being recomputed): ATen's op runs on copies of the running statistics, so that it saves
    the very same tensors for its backward as the undeferred call (a recomputation must), and the
    batch goes to :meth:`RunningStatistics.record`, which defers it."""
    copies = running.mean.detach().clone(), running.var.detach().clone()
    y, mean, invstd = _checked_batch_norm(input, weight, bias, *copies, 0.0, eps)
    var = variance_from_invstd(invstd.detach().double(), eps)
    count = input.numel() // input.shape[1]
    running.record(mean.detach(), var.to(mean.dtype), count, strict)
    return _laid_out_and_activated(y, input, activation, param)


batch_statistics = composite.batch_statistics


def batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight,
    mean,
    var,
    training: bool,
    eps: float,
    output_mask: Sequence[bool] = (True, True, True),
    mask=None,
):
    """See :meth:`bnlab.kernels.contract.Kernels.batch_norm_backward`."""
    if mean is None:  # statistics recomputed from x
        var, mean = torch.var_mean(
            x.to(_statistics_dtype(x)), [0, *range(2, x.dim())], correction=0
        )
    wanted = [output_mask[0], weight is not None and output_mask[1], output_mask[2]]
    weight = _mixed_params(x, weight, None)[0]
    half = x.dtype if x.dtype in _HALF else None
    if half is not None:  # ATen's mixed backward keeps half intermediates: dx lost ~100s of ulps
        grad_out, x = grad_out.float(), x.float()
    mean, var = mean.to(_statistics_dtype(x)), var.to(_statistics_dtype(x))
    if training:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, torch.rsqrt(var + eps), True, eps, wanted
        )
    else:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, eps, wanted
        )
    dx = None if dx is None else laid_out_like(dx, x).to(half or dx.dtype)
    return (dx if wanted[0] else None, dw if wanted[1] else None, db if wanted[2] else None)


batch_norm_act_forward = composite.activated(batch_norm_forward)


batch_norm_act_backward = composite.activated_backward(batch_norm_backward)
