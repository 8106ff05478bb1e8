"""The running-statistics rules, written once: every batch norm in bnlab keeps its buffers by them.

- the unbiased factor m / (m - 1) that turns a batch's biased variance into the estimate the
  running variance tracks (Ioffe & Szegedy 2015, Algorithm 2; PyTorch does the same);
- the guarded update: an exponential moving average (or, ``momentum=None``, the cumulative
  average) that a batch with any non-finite statistic leaves untouched, ``num_batches_tracked``
  included, decided on the device (no host synchronisation) or, on the CPU, on the host;
- Chan, Golub & LeVeque's merge of (count, mean, M2) summaries of parts into the whole's
  ("Updating formulae and a pairwise algorithm for computing sample variances", 1979);
- :class:`NonFiniteStatisticsError` and the strict mode's check;
- when an update is *deferred* instead of applied: during :class:`accumulate` (gradient
  accumulation: one update per optimizer step, with the merged statistics of its micro-batches)
  and while ``torch.utils.checkpoint`` recomputes a forward inside the backward (which must not
  update a second time).

This module sits below everything that keeps statistics (:mod:`bnlab.functional`,
:mod:`bnlab.distributed`, :mod:`bnlab.inference`, :mod:`bnlab.nn`, :mod:`bnlab.kernels.native`) and
imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NonFiniteStatisticsError",
    "unbiased_factor",
    "variance_from_invstd",
    "RunningStatistics",
    "update_running_stats",
    "all_finite_on_host",
    "raise_if_not_finite",
    "merge_statistics",
    "accumulate",
    "recomputing",
    "updates_deferred",
    "count_batch",
]

Count = Union[int, Tensor]


class NonFiniteStatisticsError(FloatingPointError):
    """A training batch produced non-finite statistics (raised only in strict mode)."""


def unbiased_factor(count: Count):
    """m / (m - 1): the biased variance of m values times this is the unbiased estimate."""
    return count / (count - 1)


def variance_from_invstd(invstd: Tensor, eps: float) -> Tensor:
    """The biased variance behind ATen's 1 / sqrt(var + eps): 1 / invstd^2 - eps, clamped at 0
    (the subtraction can round below it). In ``invstd``'s dtype: pass float64 for the accuracy
    of a recorded statistic."""
    return (invstd.reciprocal().square() - eps).clamp_(min=0.0)


@dataclass(slots=True)
class RunningStatistics:
    """A batch norm's running statistics: the buffers a training batch updates in place, and how.

    Attributes:
        mean, var: (C,) buffers, or both None (statistics not tracked).
        num_batches_tracked: integer scalar buffer counting the batches recorded, or None.
        momentum: the moving-average factor, or None for the cumulative average (which needs
            ``num_batches_tracked``).
    """

    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1

    def record(self, mean: Tensor, var: Tensor, count: Count, strict: bool = False) -> None:
        """After a training batch with statistics (mean, biased var) over ``count`` values per
        channel: fold them into the buffers (if tracked; skipped for a non-finite batch), and in
        ``strict`` mode raise on non-finite statistics. An empty batch has no statistics: nothing
        is recorded, nothing raised, ``num_batches_tracked`` is not counted."""
        if isinstance(count, int) and count == 0:
            return
        if self.mean is not None:
            update_running_stats(
                self.mean,
                self.var,
                self.num_batches_tracked,
                mean,
                var * unbiased_factor(count),
                self.momentum,
                count=count,
            )
        if strict:
            raise_if_not_finite(mean, var)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Optional[Tensor],
    mean: Tensor,
    unbiased_var: Tensor,
    momentum: Optional[float],
    finite: Optional[Tensor] = None,
    *,
    count: Optional[Count] = None,
    pooled: bool = False,
) -> None:
    """running <- running + w * (batch - running), skipped whole for a non-finite batch.

    w = momentum, or 1 / num_batches_tracked (the cumulative average, ``momentum=None``; the
    counter is incremented first). ``finite``: the verdict when the caller has it (a bool tensor);
    otherwise decided from the statistics. On the device: w = 0 for a non-finite batch, whose
    statistics are zeroed first so they cannot leak in (no host synchronisation); on the CPU,
    where a host decision is free, with half the small ops.

    Deferred (see :func:`updates_deferred`): inside :class:`accumulate` the batch is recorded
    instead, as ``count`` values per channel (``pooled``: mean and variance are averages over
    parts, e.g. ghost batch norm's virtual batches, and merge as averages); while a checkpointed
    forward is recomputed, nothing happens.
    """
    if _deferred():
        buffers = (running_mean, running_var, num_batches_tracked)
        _defer(_Update(buffers, mean, unbiased_var, momentum, finite, count, pooled))
        return
    _apply(running_mean, running_var, num_batches_tracked, mean, unbiased_var, momentum, finite)


@torch.no_grad()
def _apply(running_mean, running_var, num_batches_tracked, mean, unbiased_var, momentum, finite):
    """The guarded update itself (see :func:`update_running_stats`)."""
    on_host = (
        finite is None and running_mean.device.type == "cpu" and not torch.compiler.is_compiling()
    )
    if on_host:
        if not all_finite_on_host(mean, unbiased_var):
            return
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        weight = momentum if momentum is not None else 1.0 / int(num_batches_tracked)
        running_mean.lerp_(mean.to(running_mean.dtype), weight)
        running_var.lerp_(unbiased_var.to(running_var.dtype), weight)
        return
    if finite is None:
        finite = torch.isfinite(mean + unbiased_var).all()  # inf + NaN, NaN + x: any shows
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
        weight = finite.to(running.dtype)  # in the buffer's precision: 0.1 is not a float32
        if momentum is not None:
            weight = weight * momentum
        else:
            weight = weight / num_batches_tracked.clamp(min=1)
        running.lerp_(batch.nan_to_num(0.0, 0.0, 0.0).to(running.dtype), weight)


def all_finite_on_host(*tensors: Tensor) -> bool:
    """Whether every value is finite, decided with NumPy where it can (a fifth of torch.isfinite's
    cost on a small CPU vector)."""
    for t in tensors:
        if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
            finite = np.isfinite(t.detach().numpy()).all()
        else:
            finite = torch.isfinite(t).all()
        if not finite:
            return False
    return True


def raise_if_not_finite(mean: Tensor, var: Tensor) -> None:
    """Raise :class:`NonFiniteStatisticsError` naming the channels with non-finite statistics."""
    bad = ~(torch.isfinite(mean) & torch.isfinite(var))
    if bool(bad.any()):
        channels = bad.nonzero().flatten().tolist()
        shown = channels[:20] + (["..."] if len(channels) > 20 else [])
        raise NonFiniteStatisticsError(
            f"batch statistics are not finite in {len(channels)} of {mean.numel()} channels "
            f"(channels {shown}); running statistics were left unchanged"
        )


def merge_statistics(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Combine per-part (count, mean, M2) into the whole's (count, mean, M2).

    Chan, Golub & LeVeque's parallel formula, in its k-part form: with n = sum_p n_p,

    .. math::
        \mu = \sum_p \frac{n_p}{n} \mu_p, \qquad
        M_2 = \sum_p M_{2,p} + \sum_p n_p (\mu_p - \mu)^2

    (the biased variance is M2 / n, the unbiased M2 / (n - 1)).

    Args:
        counts: (P,) values per part, or (P, C) per part and channel; any may be 0.
        means, m2s: (P, C) per-part means and sums of squared deviations from them; an empty
            part's entries must be finite (they get weight 0).

    Returns:
        (n, mean, m2): n summed over the parts, mean and m2 (C,), in the inputs' dtype. An empty
        whole (n = 0) gives mean and M2 0 (so merging into it is the other side).

    Numerically stable: no E[x^2] - E[x]^2 cancellation; the spread between the parts enters
    through (mu_p - mu)^2, computed from means. A non-finite part makes the result non-finite.
    """
    weights = counts if counts.dim() == means.dim() else counts.unsqueeze(1)  # (P, C) or (P, 1)
    n = counts.sum(0)
    share = torch.where(n > 0, weights / n.clamp(min=1), torch.zeros_like(weights))
    mean = (share * means).sum(0)  # (C,)
    spread = (weights * (means - mean).square()).sum(0)  # (C,)
    return n, mean, m2s.sum(0) + spread


# --------------------------------------------------------------------------------------------
# deferred updates: gradient accumulation and checkpoint recomputation
# --------------------------------------------------------------------------------------------

_ACTIVE: list["accumulate"] = []  # the open accumulate contexts, innermost last


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: ``torch.utils.checkpoint`` recomputing a
    checkpointed forward (both ``use_reentrant`` values run it from the autograd engine). Its
    batch was recorded by the original forward already: recording it again would count it twice
    (pytorch/pytorch#96136)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _deferred() -> bool:
    return bool(_ACTIVE) or recomputing()


def may_defer_eagerly() -> bool:
    """A quick test for eager callers (never under ``torch.compile``): False when no update can
    be deferred now, no :class:`accumulate` open and no checkpoint recomputation running; True
    sends the caller the general way, which asks :func:`updates_deferred` about its buffers.
    :func:`_deferred` without :func:`recomputing`'s compile test, inlined: one frame instead of
    several, on every training call of every layer."""
    return bool(_ACTIVE) or torch._C._current_graph_task_id() != -1


def updates_deferred(running_mean: Optional[Tensor]) -> bool:
    """Whether a training batch's update of these buffers must not be applied now (an open
    :class:`accumulate` holding them, or a checkpoint recomputation). Kernels that update running
    statistics inside themselves (ATen's) must then leave the buffers alone and report the
    batch through :func:`update_running_stats` instead."""
    if running_mean is None:
        return False
    return recomputing() or any(acc.holds(running_mean) for acc in _ACTIVE)


def count_batch(num_batches_tracked: Tensor) -> None:
    """One more training batch for a layer that keeps its own counter beside statistics it
    records per part (BN-LSTM: one counter, statistics per time step): +1 now, or once at the
    exit of the :class:`accumulate` holding it, or not at all while a checkpoint recomputes."""
    if recomputing():
        return
    for acc in reversed(_ACTIVE):
        if acc.holds(num_batches_tracked):
            acc.counters[num_batches_tracked.untyped_storage().data_ptr()] = num_batches_tracked
            return
    num_batches_tracked.add_(1)


def _buffer_key(t: Tensor) -> tuple:
    """The memory a buffer (or a view into one, e.g. a BN-LSTM time step's rows) occupies."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


@dataclass(frozen=True)
class _Update:
    """One batch's update of one layer's buffers, as :func:`update_running_stats` received it."""

    buffers: tuple  # (running_mean, running_var, num_batches_tracked)
    mean: Tensor
    unbiased_var: Tensor
    momentum: Optional[float]
    finite: Optional[Tensor]
    count: Optional[Count]
    pooled: bool

    def apply(self) -> None:
        _apply(*self.buffers, self.mean, self.unbiased_var, self.momentum, self.finite)


def _defer(update: _Update) -> None:
    if recomputing():
        return
    for acc in reversed(_ACTIVE):
        if acc.holds(update.buffers[0]):
            acc.add(update)
            return
    update.apply()


@dataclass
class _Parts:
    """The micro-batches one set of buffers saw inside an :class:`accumulate`."""

    buffers: tuple  # (running_mean, running_var, num_batches_tracked)
    momentum: Optional[float]
    pooled: bool
    counts: list = field(default_factory=list)
    means: list = field(default_factory=list)
    variances: list = field(default_factory=list)  # unbiased
    finite: list = field(default_factory=list)


@dataclass
class AccumulatedLayer:
    """What :class:`accumulate` did with one layer's buffers at its exit."""

    name: str
    merged: int  # micro-batch calls merged into the one update
    skipped: int  # calls left out for non-finite statistics
    count: float  # values per channel in the merged statistics


class accumulate:
    r"""Gradient accumulation without the running-statistics error: inside this context, every
    training batch norm of ``model`` normalizes each micro-batch with its own statistics (as
    always) but *records* them instead of updating; at the exit each layer gets **one** update
    with the statistics of all its recorded micro-batches taken together, and
    ``num_batches_tracked`` grows by one.

    The merge is Chan et al.'s (:func:`merge_statistics`): with n_p values per channel, mean
    mu_p and unbiased variance s_p^2 in micro-batch p, n = sum n_p,

    .. math::
        \mu = \sum_p \frac{n_p}{n}\mu_p, \qquad
        s^2 = \frac{\sum_p (n_p - 1) s_p^2 + \sum_p n_p (\mu_p - \mu)^2}{n - 1}

    so a first layer ends exactly as after one training forward of the concatenated batch (deeper
    layers see inputs normalized per micro-batch, and merge what they saw). Layers whose
    statistics are averages over parts (ghost batch norm's virtual batches) merge them as
    count-weighted averages. A micro-batch with non-finite statistics is left out and counted; a
    layer called several times per micro-batch merges every call. Exiting on an exception applies
    nothing (the step is being abandoned).

    Example::

        with bnlab.accumulate(model) as acc:
            for x, y in micro_batches:
                loss_fn(model(x), y).backward()
        optimizer.step()
        print(acc.report)  # per layer: calls merged, skipped, values per channel

    Covers every module whose buffers are updated through :func:`update_running_stats` (bnlab's
    batch norms, converted models) and, through :func:`updates_deferred`, bnlab's ATen path.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.report: list[AccumulatedLayer] = []
        self._names: dict[tuple, str] = {}
        self._storages: set[int] = set()
        self._parts: dict[tuple, _Parts] = {}

    def __enter__(self) -> "accumulate":
        buffers = list(self.model.named_buffers())
        self._names = {_buffer_key(b): _layer_name(name) for name, b in buffers}
        self._storages = {b.untyped_storage().data_ptr() for _, b in buffers}
        self.counters: dict[int, Tensor] = {}
        self._parts = {}
        self.report = []
        _ACTIVE.append(self)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        _ACTIVE.remove(self)
        if exc_type is None:
            self._apply_all()

    def holds(self, running_mean: Tensor) -> bool:
        """Whether ``running_mean`` is one of the model's buffers or a view into one."""
        return running_mean.untyped_storage().data_ptr() in self._storages

    def add(self, update: _Update) -> None:
        """Record one batch of a layer this context holds."""
        if update.count is None:
            raise RuntimeError(
                "bnlab.accumulate: this batch norm reported its statistics without a count of "
                "values, which the merge needs"
            )
        key = _buffer_key(update.buffers[0])
        parts = self._parts.setdefault(key, _Parts(update.buffers, update.momentum, update.pooled))
        finite = update.finite
        if finite is None:
            finite = torch.isfinite(update.mean + update.unbiased_var).all()
        parts.counts.append(update.count)
        parts.means.append(update.mean.detach())
        parts.variances.append(update.unbiased_var.detach())
        parts.finite.append(finite)

    def _apply_all(self) -> None:
        for key, parts in self._parts.items():
            finite = [bool(f) for f in parts.finite]
            keep = [i for i, ok in enumerate(finite) if ok]
            name = self._names.get(key, "") or _view_name(key, self._names)
            if not keep:
                self.report.append(AccumulatedLayer(name, 0, len(finite), 0.0))
                continue
            n, mean, unbiased_var = _merged(parts, keep)
            self.report.append(AccumulatedLayer(name, len(keep), len(finite) - len(keep), n))
            _apply(*parts.buffers, mean, unbiased_var, parts.momentum, None)
        for counter in self.counters.values():
            counter.add_(1)


def _merged(parts: _Parts, keep: list[int]) -> tuple[float, Tensor, Tensor]:
    """(n, mean, unbiased variance) of the kept micro-batches together."""
    dtype = torch.float64  # exact enough for any count; the buffers' dtype comes at the update
    counts = torch.tensor([float(parts.counts[i]) for i in keep], dtype=dtype)
    means = torch.stack([parts.means[i].to(dtype) for i in keep])
    variances = torch.stack([parts.variances[i].to(dtype) for i in keep])
    counts = counts.to(means.device)
    if parts.pooled:  # averages over parts: averaged again, weighted by count
        share = (counts / counts.sum()).unsqueeze(1)
        return float(counts.sum()), (share * means).sum(0), (share * variances).sum(0)
    m2s = variances * (counts - 1).unsqueeze(1)
    n, mean, m2 = merge_statistics(counts, means, m2s)
    return float(n), mean, m2 / (n - 1)


def _layer_name(buffer_name: str) -> str:
    """'layer1.0.bn1.running_mean' -> 'layer1.0.bn1'; a root layer's buffer -> '<root>'."""
    owner, _, _ = buffer_name.rpartition(".")
    return owner or "<root>"


def _view_name(key: tuple, names: dict) -> str:
    """A buffer view's name: its buffer's, with the offset (e.g. one BN-LSTM time step)."""
    for k, name in names.items():
        if k[1] == key[1]:
            return f"{name}[offset {key[2]}]"
    return "?"
