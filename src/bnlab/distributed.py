"""Batch statistics across processes (torch.distributed): the op of :class:`bnlab.nn.SyncBatchNorm`.

Batch norm whose statistics are those of the concatenation of every rank's batch (Ioffe & Szegedy
2015, Algorithm 1, with B the union of the per-rank batches), so that training on W processes with
per-rank batches B_1..B_W computes what one process computes on B_1 + ... + B_W: outputs, input
gradients, running statistics (with the unbiased factor m / (m - 1) of the *global* m) and
``num_batches_tracked``. Per-rank batches may differ in size and may be empty (N = 0).

One collective per direction and layer:

- forward: one ``all_gather`` of a (3 + 2C,) float64 row per rank (count, call index, C, per-channel
  means, per-channel sums of squared deviations M2), merged with Chan et al.'s parallel formula;
- backward: one ``all_reduce`` (SUM) of the per-channel sum(dy) and sum(dy * xhat), and of every
  rank's call index (one slot per rank, so that disagreeing ranks are named).

Ranks that disagree are an error, never a hang: every exchange carries the layer's call index
(and channel count), compared on every rank; an exchange that another rank does not join fails after
``timeout`` (or the process group's own timeout) with :class:`SyncBatchNormError`, and one whose
peer died fails as soon as the backend notices. Limits of what the call index can see: two layers of
the same width that ranks call in swapped order, equally often, are not told apart (their counts
agree; a skipped call is caught when the counts part, or by the timeout); rows of different widths
(a rank at a layer with another C) make gloo abort the rank that receives the longer row ("Received
data size doesn't match expected size"), while the others raise SyncBatchNormError naming both
widths.

Layering: this module sits between :mod:`bnlab.nn` (which uses it) and :mod:`bnlab.functional` /
:mod:`bnlab.kernels` (which it uses). The collectives live in a ``torch.autograd.Function``, not in
a ``torch.library`` op; the op is meant for eager mode (it reads the gathered counts on the host).
"""

from __future__ import annotations

import datetime
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional as F
from .checks import check_batch_norm_args, check_mask
from .kernels import Backend, select_backend
from .kernels.composite import (
    accumulation_dtype,
    laid_out_like,
    per_channel,
    training_input_grad,
    values_per_channel,
)
from .ops import batch_norm_op_name
from .statistics import RunningStatistics, merge_statistics

__all__ = [
    "sync_batch_norm",
    "batch_norm_over_group",
    "resolve_group",
    "world_size",
    "SyncBatchNormError",
]

TimeoutLike = Union[None, int, float, datetime.timedelta]

_HEADER = 3  # count, call index, channels: the start of every forward row
_EXCHANGE_DTYPE = torch.float64  # exact counts and call indices up to 2**53, an exact merge


class SyncBatchNormError(RuntimeError):
    """Ranks disagree about a synchronized batch-norm call, or one did not join it in time."""


# --------------------------------------------------------------------------------------------
# process groups and timeouts
# --------------------------------------------------------------------------------------------


def world_size(process_group=None) -> int:
    """Ranks in ``process_group`` (the default group when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def resolve_group(process_group):
    """The group to synchronize over, or None when there is no other rank to synchronize with."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group "
            "given to SyncBatchNorm; build the layer with a group this rank belongs to"
        )
    return group if dist.get_world_size(group) > 1 else None


def as_timeout(timeout: TimeoutLike) -> Optional[datetime.timedelta]:
    """``timeout`` (seconds or a timedelta) as a positive timedelta; None stays None."""
    if timeout is None:
        return None
    if not isinstance(timeout, datetime.timedelta):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(
                f"timeout must be seconds (int/float), a timedelta or None, got {timeout!r}"
            )
        timeout = datetime.timedelta(seconds=timeout)
    if not timeout.total_seconds() > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    return timeout


def _weak(group) -> Callable[[], object]:
    """A weak reference to a process group (a plain reference for objects that refuse weak ones).

    The autograd graph of a training forward keeps its :class:`_Call` until the graph is freed,
    which a script's last ``loss`` (or one caught in a reference cycle) delays to interpreter exit.
    A strong reference there kept the group alive past ``dist.destroy_process_group()``, and gloo's
    threads were then torn down during interpreter shutdown, where they can abort the process
    ("terminate called without an active exception").
    """
    try:
        return weakref.ref(group)
    except TypeError:
        return lambda: group


@dataclass(frozen=True)
class _Call:
    """One synchronized call of a layer: where it runs and what to say when it goes wrong."""

    group_ref: Callable[[], object]  # weak (see _weak): the graph must not keep the group alive
    rank: int  # in the group
    world: int
    index: int  # the layer's training-call counter, identical on every rank when all is well
    channels: int
    timeout: Optional[datetime.timedelta]

    def where(self, direction: str) -> str:
        return (
            f"SyncBatchNorm {direction} ({self.channels} channels, training call {self.index} of "
            f"this layer) on rank {self.rank} of {self.world}"
        )

    def group(self, direction: str):
        """The process group, or a SyncBatchNormError when it has been destroyed since the
        forward (a backward after ``dist.destroy_process_group()``)."""
        group = self.group_ref()
        if group is None:
            raise SyncBatchNormError(
                f"{self.where(direction)}: the process group of this call's forward no longer "
                "exists (destroyed by dist.destroy_process_group()?); run every backward before "
                "destroying the group"
            )
        return group


_ADVICE = (
    "Every rank must run each SyncBatchNorm layer in training mode the same number of times and in "
    "the same order, forward and backward: look for a rank that stopped or crashed (check its "
    "log), data-dependent control flow (skipped layers or steps), or an uneven number of batches "
    "per rank (a rank with no data should still call the layer with an empty batch, N = 0)."
)


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------


def _wait(work, call: _Call, direction: str, what: str) -> None:
    """Wait for ``work``: a timeout or a lost peer is a SyncBatchNormError that says what to do."""
    start = time.monotonic()
    try:
        work.wait(call.timeout or datetime.timedelta(0))  # 0: the process group's own timeout
    except (
        RuntimeError
    ) as error:  # DistBackendError, gloo/NCCL timeouts, "Connection closed by peer"
        elapsed = time.monotonic() - start
        if call.timeout is not None and elapsed >= 0.99 * call.timeout.total_seconds():
            outcome = f"did not complete within the {call.timeout.total_seconds():g} s timeout"
        elif "timed out" in str(error).lower() or "timeout" in str(error).lower():
            outcome = "did not complete within the process group's timeout"
        else:  # typically a peer that went away
            outcome = f"failed after {elapsed:.1f} s"
        raise SyncBatchNormError(
            f"{call.where(direction)}: the exchange of {what} {outcome} "
            f"({type(error).__name__}: {error}). Another rank left or did not make the matching "
            f"call. {_ADVICE} Raise `timeout` only if a rank is merely slow. The process group "
            "cannot be used after this error: end the process (or destroy the group)."
        ) from error


def _all_gather(row: Tensor, call: _Call) -> Tensor:
    """Every rank's ``row``: (world, len(row)), row r from group rank r."""
    rows = [torch.zeros_like(row) for _ in range(call.world)]
    work = dist.all_gather(rows, row, group=call.group("forward"), async_op=True)
    _wait(work, call, "forward", "batch statistics")
    return torch.stack(rows)


def _all_reduce(buffer: Tensor, call: _Call) -> Tensor:
    group = call.group("backward")
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)
    _wait(work, call, "backward", "gradient sums")
    return buffer


def _check_same_call(
    calls: list[float], channels: list[float], call: _Call, direction: str
) -> None:
    """Raise on every rank if any rank is at another call index (or layer width) than this one."""
    own = (call.index, call.channels)
    differ = [r for r, key in enumerate(zip(calls, channels)) if key != own]
    if not differ:
        return
    shown = sorted({call.rank, *differ[:8]})  # this rank and the first that disagree with it
    seen = ", ".join(
        f"rank {r}: call {int(calls[r])} of a {int(channels[r])}-channel layer" for r in shown
    )
    if len(differ) > 8:
        seen += f", and {len(differ) - 8} more ranks that disagree with rank {call.rank}"
    raise SyncBatchNormError(
        f"{call.where(direction)}: ranks disagree about which SyncBatchNorm call this is ({seen}). "
        f"{_ADVICE}"
    )


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def _local_statistics(
    input: Tensor, mask: Optional[Tensor], kernels: Backend
) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's (count, mean, M2) per channel over its (valid) positions, by the backend's
    kernels (:meth:`bnlab.kernels.contract.Kernels.batch_statistics`).

    Returns a 0-dim float64 count and (C,) mean and M2 in the accumulation dtype; zeros where the
    count is 0 (their weight in the merge is 0, and NaN * 0 would still be NaN).
    """
    acc = accumulation_dtype(input.dtype)
    if mask is None:
        values = values_per_channel(input)
        count = torch.tensor(float(values), dtype=_EXCHANGE_DTYPE, device=input.device)
        if values == 0:  # the statistics of nothing are NaN
            zeros = input.new_zeros(input.shape[1], dtype=acc)
            return count, zeros, zeros.clone()
    else:
        count = mask.sum().to(_EXCHANGE_DTYPE)  # on the device: no host sync here
    mean, var = kernels.module.batch_statistics(input.detach(), mask)
    if mask is not None:  # an empty part: zeros, not NaN
        mean, var = (torch.where(count > 0, t, 0) for t in (mean, var))
    return count, mean.to(acc), (var * count).to(acc)


def _global_statistics(
    input: Tensor, mask: Optional[Tensor], call: Optional[_Call], kernels: Backend
):
    """(count, mean, var) over every rank's valid positions: count a Python int, mean and biased
    var (C,) in the accumulation dtype (NaN for count 0, as batch norm on an empty batch)."""
    acc = accumulation_dtype(input.dtype)
    count, mean, m2 = _local_statistics(input, mask, kernels)
    mean, m2 = mean.to(_EXCHANGE_DTYPE), m2.to(_EXCHANGE_DTYPE)
    if call is None:  # this process alone: one part
        n, mean, m2 = merge_statistics(count.view(1), mean.unsqueeze(0), m2.unsqueeze(0))
        return int(n.item()), _mean_or_nan(mean, n).to(acc), (m2 / n).to(acc)
    header = torch.tensor([call.index, call.channels], dtype=_EXCHANGE_DTYPE, device=input.device)
    table = _all_gather(torch.cat([count.view(1), header, mean, m2]), call)  # (W, 3 + 2C)
    counts, calls, channels = table[:, :_HEADER].T.tolist()  # the one host read of the forward
    _check_same_call(calls, channels, call, "forward")
    means, m2s = table[:, _HEADER:].unflatten(1, (2, -1)).unbind(1)  # (W, C) each
    n, mean, m2 = merge_statistics(table[:, 0], means, m2s)
    return int(sum(counts)), _mean_or_nan(mean, n).to(acc), (m2 / n).to(acc)


def _mean_or_nan(mean: Tensor, n: Tensor) -> Tensor:
    """The merged mean, NaN when there is nothing to average (as batch norm on an empty batch)."""
    return torch.where(n > 0, mean, float("nan"))


# --------------------------------------------------------------------------------------------
# the op: normalize with the global statistics; backward with globally reduced sums
# --------------------------------------------------------------------------------------------


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with (mean, var) given, the global batch statistics.

    Forward normalizes with the selected backend's kernels (its eval path: given statistics).
    Backward treats mean and var as the functions of every rank's input they are (Ioffe & Szegedy
    2015, section 3, in the compact form of
    :meth:`bnlab.kernels.contract.Kernels.batch_norm_backward`): this rank's sum(dy) and sum(dy *
    xhat) come from the same backend, summed over the ranks.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, mask, count, eps, call, kernels):
        out, _, _ = kernels.module.batch_norm_forward(input, weight, bias, mean, var, False, eps)
        ctx.save_for_backward(input, weight, mean, var, mask)
        ctx.count, ctx.eps, ctx.call, ctx.kernels = count, eps, call, kernels
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, mean, var, mask = ctx.saved_tensors
        sum_dy_xhat, sum_dy = _local_sums(grad_out, input, mean, var, ctx.eps, ctx.kernels)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same model), as in torch.nn's SyncBN
            total_dy, total_dy_xhat = _global_sums(sum_dy, sum_dy_xhat, ctx.call)
            dx = _input_grad(
                grad_out,
                input,
                weight,
                mean,
                var,
                ctx.eps,
                total_dy,
                total_dy_xhat,
                ctx.count,
                mask,
            )
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xhat.to(ctx.param_dtypes[0])  # local: DDP reduces parameter grads
        if ctx.needs_input_grad[2]:
            dbias = sum_dy.to(ctx.param_dtypes[1])
        return dx, dweight, dbias, None, None, None, None, None, None, None


def _local_sums(grad_out, input, mean, var, eps, kernels: Backend) -> tuple[Tensor, Tensor]:
    """This rank's sum(dy * xhat) and sum(dy) per channel over all its positions: the parameter
    gradients of a batch norm with weight 1, from the backend's backward kernel."""
    acc = accumulation_dtype(input.dtype)
    ones = torch.ones(input.shape[1], dtype=acc, device=input.device)
    _, sum_dy_xhat, sum_dy = kernels.module.batch_norm_backward(
        grad_out, input, ones, mean, var, True, eps, (False, True, True)
    )
    return sum_dy_xhat.to(acc), sum_dy.to(acc)


def _global_sums(
    sum_dy: Tensor, sum_dy_xhat: Tensor, call: Optional[_Call]
) -> tuple[Tensor, Tensor]:
    """sum(dy), sum(dy * xhat) over every rank (one all_reduce that also compares call indices)."""
    if call is None:
        return sum_dy, sum_dy_xhat
    calls = sum_dy.new_zeros(call.world, dtype=_EXCHANGE_DTYPE)  # (W,): one slot per rank
    calls[call.rank] = call.index
    buffer = torch.cat([calls, sum_dy.to(_EXCHANGE_DTYPE), sum_dy_xhat.to(_EXCHANGE_DTYPE)])
    buffer = _all_reduce(buffer, call)  # (W + 2C,)
    _check_same_call(buffer[: call.world].tolist(), [call.channels] * call.world, call, "backward")
    total_dy, total_dy_xhat = buffer[call.world :].view(2, -1).to(sum_dy.dtype)  # (C,) each
    return total_dy, total_dy_xhat


def _input_grad(grad_out, input, weight, mean, var, eps, total_dy, total_dy_xhat, count, mask):
    """dx of :func:`bnlab.kernels.composite.training_input_grad` with the sums and the count of
    every rank, laid out like the input."""
    acc = accumulation_dtype(input.dtype)
    xa, dy = input.to(acc), grad_out.to(acc)
    invstd = torch.rsqrt(var + eps)  # (C,), as the forward kernels compute it
    xhat = (xa - per_channel(mean, xa)) * per_channel(invstd, xa)  # (N, C, *)
    scale = invstd if weight is None else invstd * weight.to(acc)  # (C,)
    dx = training_input_grad(dy, xhat, scale, total_dy, total_dy_xhat, count, mask)
    return laid_out_like(dx, input)


def batch_norm_over_group(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running: RunningStatistics,
    eps: float,
    *,
    mask: Optional[Tensor] = None,
    group=None,
    timeout: TimeoutLike = None,
    call_index: int = 0,
    strict: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Training-mode :func:`sync_batch_norm` over an already resolved ``group`` (see
    :func:`resolve_group`; None: this process alone), arguments already checked: what
    :class:`bnlab.nn.SyncBatchNorm` calls on every training step."""
    call = None
    if group is not None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        call = _Call(
            _weak(group), rank, world, int(call_index), input.shape[1], as_timeout(timeout)
        )
    kernels = select_backend(batch_norm_op_name(mask, True), input, backend)
    count, mean, var = _global_statistics(input, mask, call, kernels)
    if count == 1:  # the same verdict on every rank: all raise, none is left waiting
        where = ""
        if call is not None:
            where = f" on this rank and 1 value per channel over all {call.world} ranks"
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
            f"{' with 1 valid position' if mask is not None else ''}{where}"
        )
    args = (input, weight, bias, mean, var, mask, count, eps, call, kernels)
    out = _SyncBatchNormFunction.apply(*args)
    running.record(mean, var, count, strict)
    return out


def sync_batch_norm(
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
    process_group=None,
    timeout: TimeoutLike = None,
    call_index: int = 0,
    strict: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Batch norm with the statistics of every rank's batch together (synchronized batch norm).

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta, \qquad
        B = B_1 \cup \dots \cup B_W \ \text{(every rank's valid positions)}

    Arguments as :func:`bnlab.functional.batch_norm`, plus the keyword-only ones below. In eval mode
    (``training=False``) this is :func:`bnlab.functional.batch_norm`: no communication.

    Args:
        input: (N, C, *) on this rank; N may differ between ranks and be 0.
        mask: optional bool (N, *) (input's shape without dim 1), True at valid positions: the
            statistics run over valid positions only; every position is normalized with them.
        process_group: ranks to synchronize over; None: the default group. Without an initialized
            torch.distributed, or with one rank, the statistics are this process's.
        timeout: seconds (or a timedelta) to wait for the other ranks at each exchange; None: the
            process group's own timeout. Exceeding it raises :class:`SyncBatchNormError`.
        call_index: this call's number, identical on every rank (the module passes its training-call
            counter); ranks whose indices differ raise :class:`SyncBatchNormError`.

    Shape:
        input and output (N, C, *), contiguous or channels_last; mask (N, *).

    Details:
        - per rank: count, per-channel mean and M2 = sum (x - mean)^2 in the accumulation dtype
          (float32 for float16/bfloat16/float32 inputs, float64 for float64), two-pass;
        - exchanged and merged in float64 (counts exact to 2**53) with Chan's parallel formula, see
          :func:`merge_statistics`: empty ranks have weight 0; the merged mean and *biased* variance
          normalize, ``running_var`` gets the unbiased one with the *global* m (times m / (m - 1));
        - a global m of 1 raises ValueError on every rank (as batch norm); a global m of 0 gives NaN
          statistics, an empty output and no running-statistics update;
        - running statistics as :func:`bnlab.functional.batch_norm`: EMA or cumulative average
          (``momentum=None``), skipped whole for non-finite statistics (decided on the device);
          every rank computes the same global statistics, so the buffers stay identical across
          ranks;
        - backward: one all_reduce of sum(dy) and sum(dy * xhat); dx uses the global sums and m.
          dweight = sum(dy * xhat) and dbias = sum(dy) are this rank's: DistributedDataParallel
          averages parameter gradients over ranks itself (as with torch.nn.SyncBatchNorm), and their
          sum over ranks is the gradient of the summed loss;
        - masked: dx is the exact derivative of the forward. A padding position's input does not
          enter the statistics, so its dx is dy * weight * invstd; its output does depend on them,
          so its dy enters sum(dy) and sum(dy * xhat) like every other position's (zero when the
          loss ignores padding outputs, the usual case). Padding values may be anything for the
          statistics, but they are normalized too: keep them finite if the loss sees their output;
        - a rank with N = 0 still takes part in both exchanges and returns an empty output and
          empty dx; one host read per forward (the gathered counts and call indices);
        - first derivatives only (the backward is ``once_differentiable``).
    """
    running = RunningStatistics(running_mean, running_var, num_batches_tracked, momentum)
    check_batch_norm_args(input, weight, bias, running, training, eps, "sync_batch_norm", False)
    check_mask(mask, input)
    if not training:  # eval: no statistics to gather, nothing to record
        return F.batch_norm(
            input, running_mean, running_var, weight, bias, eps=eps, backend=backend
        )
    return batch_norm_over_group(
        input,
        weight,
        bias,
        running,
        eps,
        mask=mask,
        group=resolve_group(process_group),
        timeout=timeout,
        call_index=call_index,
        strict=strict,
        backend=backend,
    )
