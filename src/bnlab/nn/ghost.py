"""Ghost (virtual) batch normalization (Hoffer, Hubara & Soudry 2017,
https://arxiv.org/abs/1705.08741): in training, batch norm with statistics over fixed-size slices of
a large batch; in eval, batch norm.

Buffers, ``state_dict`` keys, ``extra_repr`` conventions and the eval path are :class:`BatchNorm`'s.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F
from ..kernels.composite import accumulation_dtype, reduction_dims, values_per_channel
from ..statistics import raise_if_not_finite, update_running_stats
from .batchnorm import BatchNorm

__all__ = [
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "ghost_batch_sizes",
]


def ghost_batch_sizes(batch_size: int, virtual_batch_size: int) -> list[int]:
    """Rows of each virtual batch, in order: ``virtual_batch_size`` each, the remainder merged into
    the last one (so no virtual batch is short, and N < 2 * virtual_batch_size gives one batch).

    >>> ghost_batch_sizes(10, 4)
    [4, 6]
    """
    k = max(1, batch_size // virtual_batch_size)
    return [virtual_batch_size] * (k - 1) + [batch_size - (k - 1) * virtual_batch_size]


class GhostBatchNorm(BatchNorm):
    r"""Ghost batch normalization over any input of rank >= 2 with channels on dim 1: (N, C, *).

    .. math::
        y_i = \frac{x_i - \mu_{B_l}}{\sqrt{\sigma^2_{B_l} + \epsilon}} \gamma + \beta,
        \qquad i \in B_l

    Hoffer, Hubara & Soudry 2017, "Train longer, generalize better",
    https://arxiv.org/abs/1705.08741, Algorithm 1. In training the batch is split along dim 0 into
    virtual batches B_l of ``virtual_batch_size`` rows (see :func:`ghost_batch_sizes`), each
    normalized by its own statistics over its rows and every spatial position; gamma and beta are
    shared. In eval the layer is :class:`BatchNorm` (running statistics, or the whole batch's with
    ``track_running_stats=False``).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running = (1 - momentum) * running + momentum * batch, once per forward; None:
            cumulative average.
        affine, track_running_stats, bias, strict, backend: as :class:`BatchNorm`.
        virtual_batch_size: rows per virtual batch, >= 2 (the paper uses 128).

    Shape:
        input and output (N, C, *), contiguous or channels_last.

    Details:
        - a remainder (N not a multiple of virtual_batch_size) is merged into the last virtual
          batch, never normalized on its own: a one-row virtual batch would be all zeros. N < 2 *
          virtual_batch_size is one virtual batch, i.e. exactly :class:`BatchNorm`;
        - the running statistics are updated once per forward (num_batches_tracked += 1) toward the
          average over virtual batches, weighted by their rows, of their means and of their
          *unbiased* variances (times m_l / (m_l - 1), m_l = rows * prod(spatial)): running_mean
          then moves toward the whole batch's mean, running_var toward the variance the virtual
          batches see. The paper applies the moving average once per virtual batch instead;
        - the equal-size virtual batches go through one :func:`bnlab.functional.batch_norm` call,
          (k * vbs, C, *) viewed as (k, vbs, C, *) and copied to (vbs, k * C, *) with gamma, beta
          repeated k times: channel j * C + c is channel c of virtual batch j, so its statistics and
          hand-written gradient are that virtual batch's (autograd sums the repeated gamma's
          gradient). The merged last virtual batch is a second call on a view of the input;
        - the virtual batches' statistics come out of those calls, with no second pass over the
          data: each writes its (k * C,) mean and unbiased variance into scratch running buffers
          with momentum 1 (running = batch, exactly) and counts a finite batch in a scratch
          counter. float16/bfloat16 inputs are computed in float32, statistics included; the
          output has the input's dtype and memory layout;
        - non-finite statistics in any virtual batch leave the running statistics and
          num_batches_tracked untouched, decided on the device (no host sync); ``strict`` raises,
          naming the channels (recomputing the statistics on that error path only).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        virtual_batch_size: int = 128,
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        if not isinstance(virtual_batch_size, numbers.Integral) or virtual_batch_size < 2:
            raise ValueError(
                f"virtual_batch_size must be an int >= 2 (a one-row batch has no variance), "
                f"got {virtual_batch_size!r}"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            strict=strict,
            backend=backend,
        )
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        sizes = ghost_batch_sizes(input.shape[0], self.virtual_batch_size)
        if not self.training or len(sizes) == 1 or self.statistics != "standard":
            # eval, one virtual batch, or fixed statistics (set_statistics): plain batch norm
            return super().forward(input)
        k, vbs = len(sizes) - (sizes[-1] != self.virtual_batch_size), self.virtual_batch_size
        head = _split_channels(input[: k * vbs], k)  # (vbs, k*C, *): the k equal virtual batches
        tail = input[k * vbs :]  # (vbs + remainder, C, *) or empty
        want_stats = self.running_mean is not None or self.strict
        count = input.new_zeros((), dtype=torch.long) if want_stats else None  # finite calls
        head_stats, tail_stats = _scratch(head, want_stats), _scratch(tail, want_stats)
        out = torch.empty_like(input)  # input's layout; filled through views (autograd: CopySlices)
        y = self._normalize(head, k, head_stats, count).unflatten(1, (k, -1))  # (vbs, k, C, *)
        _virtual_batch_view(out[: k * vbs], k).copy_(y)
        if tail.shape[0]:
            out[k * vbs :] = self._normalize(tail, 1, tail_stats, count)
        if want_stats:
            finite = count == 1 + bool(tail.shape[0])  # on the device
            if self.running_mean is not None:
                update_running_stats(
                    self.running_mean,
                    self.running_var,
                    self.num_batches_tracked,
                    *_pooled(head_stats, k, tail_stats, sizes),
                    self.momentum,
                    finite=finite,
                    count=values_per_channel(input),
                    pooled=True,
                )
            if self.strict and not bool(finite):
                raise_if_not_finite(*_pooled(_statistics(head), k, _statistics(tail), sizes))
        return out

    def _normalize(self, x: Tensor, k: int, stats, count: Optional[Tensor]) -> Tensor:
        """Batch norm of x with gamma, beta tiled k times; x's statistics land in ``stats``."""
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        mean, var = stats if stats is not None else (None, None)
        return F.batch_norm(
            x,
            mean,
            var,
            weight,
            bias,
            True,
            1.0,
            self.eps,
            num_batches_tracked=count,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


def _split_channels(x: Tensor, k: int) -> Tensor:
    """(k * vbs, C, *) -> (vbs, k * C, *): virtual batch j's channel c becomes channel j * C + c."""
    vbs, c = x.shape[0] // k, x.shape[1]
    return x.unflatten(0, (k, vbs)).transpose(0, 1).reshape(vbs, k * c, *x.shape[2:])  # a copy


def _virtual_batch_view(out: Tensor, k: int) -> Tensor:
    """(k * vbs, C, *) ``out`` as a (vbs, k, C, *) view, where :func:`_split_channels`'s goes.

    Not flattened to (vbs, k * C, *): that would be a copy, and the write would be lost.
    """
    return out.unflatten(0, (k, -1)).transpose(0, 1)


def _scratch(x: Tensor, wanted: bool) -> Optional[tuple[Tensor, Tensor]]:
    """Scratch running buffers of x's channels: batch_norm with momentum 1 writes x's statistics."""
    if not wanted or not x.shape[0]:
        return None
    acc = accumulation_dtype(x.dtype)
    return x.new_zeros(x.shape[1], dtype=acc), x.new_ones(x.shape[1], dtype=acc)  # (k*C,)


def _pooled(head_stats, k: int, tail_stats, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Row-weighted average over the virtual batches of their means and unbiased variances (C,)."""
    n = sum(sizes)
    mean, var = (s.view(k, -1).sum(0) * (sizes[0] / n) for s in head_stats)  # (C,)
    if tail_stats is not None:
        mean, var = (a + b * (sizes[-1] / n) for a, b in zip((mean, var), tail_stats))
    return mean, var


@torch.no_grad()
def _statistics(x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Per-channel mean and unbiased variance of x (N, C, *), in the accumulation dtype."""
    if not x.shape[0]:
        return None
    xa = x.to(accumulation_dtype(x.dtype))
    var, mean = torch.var_mean(xa, dim=reduction_dims(x), correction=1)  # (C,)
    return mean, var


class GhostBatchNorm1d(GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; see :class:`GhostBatchNorm`."""

    expected_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input, per channel; see :class:`GhostBatchNorm`."""

    expected_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm):
    """Ghost batch norm over (N, C, D, H, W) input, per channel; see :class:`GhostBatchNorm`."""

    expected_dims = (5,)
