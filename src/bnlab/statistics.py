"""The running-statistics rules, written once: every batch norm in bnlab keeps its buffers by them.

- the unbiased factor m / (m - 1) that turns a batch's biased variance into the estimate the
  running variance tracks (Ioffe & Szegedy 2015, Algorithm 2; PyTorch does the same);
- the guarded update: an exponential moving average (or, ``momentum=None``, the cumulative
  average) that a batch with any non-finite statistic leaves untouched, ``num_batches_tracked``
  included, decided on the device (no host synchronisation) or, on the CPU, on the host;
- Chan, Golub & LeVeque's merge of (count, mean, M2) summaries of parts into the whole's
  ("Updating formulae and a pairwise algorithm for computing sample variances", 1979);
- :class:`NonFiniteStatisticsError` and the strict mode's check.

This module sits below everything that keeps statistics (:mod:`bnlab.functional`,
:mod:`bnlab.distributed`, :mod:`bnlab.inference`, :mod:`bnlab.nn`, :mod:`bnlab.kernels.native`) and
imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NonFiniteStatisticsError",
    "unbiased_factor",
    "RunningStatistics",
    "update_running_stats",
    "all_finite_on_host",
    "raise_if_not_finite",
    "merge_statistics",
]

Count = Union[int, Tensor]


class NonFiniteStatisticsError(FloatingPointError):
    """A training batch produced non-finite statistics (raised only in strict mode)."""


def unbiased_factor(count: Count):
    """m / (m - 1): the biased variance of m values times this is the unbiased estimate."""
    return count / (count - 1)


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
) -> None:
    """running <- running + w * (batch - running), skipped whole for a non-finite batch.

    w = momentum, or 1 / num_batches_tracked (the cumulative average, ``momentum=None``; the
    counter is incremented first). ``finite``: the verdict when the caller has it (a bool tensor);
    otherwise decided from the statistics. On the device: w = 0 for a non-finite batch, whose
    statistics are zeroed first so they cannot leak in (no host synchronisation); on the CPU,
    where a host decision is free, with half the small ops.
    """
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
