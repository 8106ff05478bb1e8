"""Batch renormalization (Ioffe 2017, https://arxiv.org/abs/1702.03275): batch norm corrected toward
the running statistics in training, so that training and inference compute the same function.

Buffers, ``state_dict`` keys, ``extra_repr`` conventions and the eval path are :class:`BatchNorm`'s,
so a batch-norm checkpoint loads into a renorm layer and back. The warm-up schedule of r_max and
d_max is a function of ``num_batches_tracked`` and the constructor arguments alone: a checkpoint
resumes it exactly.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import functional as F
from ..kernels import select_backend
from ..kernels.composite import accumulation_dtype
from .batchnorm import BatchNorm

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


def _check_schedule(r_max, d_max, warmup_steps, r_max_steps, d_max_steps) -> None:
    if not r_max >= 1.0 or r_max == float("inf"):
        raise ValueError(
            f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}"
        )
    if not d_max >= 0.0 or d_max == float("inf"):
        raise ValueError(
            f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got {d_max}"
        )
    if not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    for name, end in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
        if not isinstance(end, numbers.Integral) or end < warmup_steps:
            raise ValueError(
                f"{name} (the step at which the ramp ends) must be an int >= warmup_steps="
                f"{warmup_steps}, got {end!r}"
            )


def _ramp(step: Tensor, start: int, end: int) -> Tensor:
    """0 up to ``start``, linear to 1 at ``end``, 1 after (a jump to 1 at ``end`` == ``start``)."""
    if end == start:
        return (step >= end).to(step.dtype)
    return ((step - start) / (end - start)).clamp(0.0, 1.0)


class BatchRenorm(BatchNorm):
    r"""Batch renormalization over any input of rank >= 2 with channels on dim 1: (N, C, *).

    .. math::
        \hat{x} = \frac{x - \mu_B}{\sigma_B} r + d, \qquad y = \gamma \hat{x} + \beta, \qquad
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

    Ioffe 2017, "Batch Renormalization", https://arxiv.org/abs/1702.03275, Algorithm 1. In training
    mu_B and sigma_B = sqrt(var_B + eps) are the batch's (biased variance, over N and every spatial
    position), mu = running_mean and sigma = sqrt(running_var + eps); r and d are constants in
    backprop (``stop_gradient``). With r = 1, d = 0 this is batch norm. In eval the layer is plain
    batch norm with the running statistics, y = gamma (x - mu) / sigma + beta, as in the paper.

    Warm-up schedule (the paper's section 4): with ``step = num_batches_tracked`` (finite training
    batches seen so far), the clip limits are 1 and 0 (plain batch norm) up to step warmup_steps,
    then grow linearly, r_max reaching ``r_max`` at step ``r_max_steps`` and d_max reaching
    ``d_max`` at step ``d_max_steps`` (a jump there when that equals warmup_steps; all three 0: no
    warm-up), and stay there. :meth:`clip_limits` gives the limits in force.

    Args:
        num_features: C.
        eps: added to the variances.
        momentum: the paper's alpha, running += momentum * (batch - running); default 0.01, the
            paper's value (torch.nn's BatchNorm uses 0.1). None: cumulative average.
        affine: learn gamma (init 1) and, if ``bias``, beta (init 0).
        track_running_stats: must be True: renormalization corrects toward the running statistics.
        r_max, d_max: final clip limits, r_max >= 1, d_max >= 0 (the paper's 3 and 5).
        warmup_steps: steps of plain batch norm before the limits start to grow (paper: 5000).
        r_max_steps, d_max_steps: steps at which r_max and d_max reach their final values (paper:
            40000 and 25000); each >= warmup_steps.
        bias, strict, backend: as :class:`BatchNorm`.

    Shape:
        input and output (N, C, *), contiguous or channels_last.

    Details:
        - the running statistics are :class:`BatchNorm`'s: running_mean is the EMA of mu_B and
          running_var the EMA of the *unbiased* batch variance (times m / (m - 1), m = N *
          prod(spatial)); sigma = sqrt(running_var + eps). The paper averages sigma_B itself;
          averaging the variance keeps the buffers torch.nn-compatible and eval exactly batch norm;
        - r and d are computed from the running statistics *before* this batch updates them, and are
          folded into the affine parameters, gamma' = gamma r and beta' = gamma d + beta, so one
          :func:`bnlab.functional.batch_norm` call does the rest (its hand-written backward, with
          gamma' as the scale, is the gradient with r, d constant). At r = 1, d = 0, gamma' and
          beta' equal gamma and beta bit for bit: outputs, gradients and buffers are BatchNorm's;
        - mu_B, sigma_B for r and d come from a separate no-grad ``torch.var_mean`` pass; float16
          and bfloat16 inputs (e.g. under ``torch.autocast``) are computed in float32, and the
          output has the input's dtype;
        - a batch with non-finite statistics leaves the running statistics and num_batches_tracked
          untouched (so the schedule does not advance), decided on the device without a host sync;
        - the schedule is computed on the device from num_batches_tracked (no host sync), with no
          extra buffers: state_dict keys are BatchNorm's. A torch.nn checkpoint brings its
          num_batches_tracked, and with it the matching point of the schedule.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm needs track_running_stats=True: r and d correct the batch statistics "
                "toward the running ones (BatchNorm(track_running_stats=False) uses batch "
                "statistics only)"
            )
        _check_schedule(r_max, d_max, warmup_steps, r_max_steps, d_max_steps)
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
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.r_max_steps, self.d_max_steps = int(r_max_steps), int(d_max_steps)

    def clip_limits(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force at step num_batches_tracked: 0-dim tensors, buffers' device.

        ``dtype`` defaults to the accumulation dtype of running_var (float32 for half buffers).
        """
        dtype = dtype or accumulation_dtype(self.running_var.dtype)
        step = self.num_batches_tracked.to(dtype)
        r_lim = 1.0 + (self.r_max - 1.0) * _ramp(step, self.warmup_steps, self.r_max_steps)
        d_lim = self.d_max * _ramp(step, self.warmup_steps, self.d_max_steps)
        return r_lim, d_lim  # exactly 1 and 0 during warm-up

    @torch.no_grad()
    def _correction(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel constants r and d, from this batch and the running statistics (C,)."""
        acc = accumulation_dtype(input.dtype)
        kernels = select_backend("batch_norm", input, self.backend).module  # the BN's own kernels
        mu_b, var_b = (t.to(acc) for t in kernels.batch_statistics(input))  # (C,)
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(self.running_var.to(acc) + self.eps)
        r_lim, d_lim = self.clip_limits(acc)
        r = torch.clamp(sigma_b / sigma, min=1.0 / r_lim, max=r_lim)
        d = torch.clamp((mu_b - self.running_mean.to(acc)) / sigma, min=-d_lim, max=d_lim)
        return r, d

    def _renormalized_affine(self, input: Tensor) -> tuple[Tensor, Tensor]:
        """gamma' = gamma r, beta' = gamma d + beta: gamma (xhat r + d) + beta as a BN affine."""
        r, d = self._correction(input)
        if self.weight is None:
            return r, d
        weight = self.weight * r  # differentiable in gamma only; r, d carry no graph
        bias = self.weight * d if self.bias is None else self.weight * d + self.bias
        return weight, bias

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or not input.is_floating_point() or self.statistics != "standard":
            # inference: plain batch norm with the running statistics (and batch_norm's clear error
            # for a non-float input, which torch.var_mean would reject less clearly); fixed
            # statistics (set_statistics): plain batch norm with them
            return super().forward(input)
        self._check_input_dim(input)
        weight, bias = self._renormalized_affine(input)
        return F.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            True,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked,
            strict=self.strict,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
            f"d_max_steps={self.d_max_steps}"
        )


class BatchRenorm1d(BatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) input; see :class:`BatchRenorm`."""

    expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """Batch renormalization over (N, C, H, W) input, per channel; see :class:`BatchRenorm`."""

    expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    """Batch renormalization over (N, C, D, H, W) input, per channel; see :class:`BatchRenorm`."""

    expected_dims = (5,)
