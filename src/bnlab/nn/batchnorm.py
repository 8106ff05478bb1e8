"""Batch-norm modules: drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and one for any rank.

Constructor arguments, parameters, buffers, ``state_dict`` keys (and version), ``reset_*`` methods
and ``extra_repr`` are torch.nn's, so checkpoints move both ways. bnlab adds two keyword-only
options: ``strict`` (raise on non-finite batch statistics) and ``backend`` (kernel backend name).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "replace_all_batch_norm_modules_",
]


class _NormBase(nn.Module):
    """Owns the parameters, buffers and checkpoint format shared by every batch-norm module."""

    _version = 2  # version 2 added num_batches_tracked; older checkpoints get it filled in
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    strict: bool = False  # class-level defaults too, for modules built by bnlab.convert
    backend: Optional[str] = None

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
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.strict = strict
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.strict:
            text += ", strict=True"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            keep = self.num_batches_tracked is not None and not self.num_batches_tracked.is_meta
            state_dict[key] = (
                self.num_batches_tracked if keep else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchNorm(_NormBase):
    r"""Batch normalization over any input of rank >= 2 with channels on dim 1: (N, C, *).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167). In training the statistics are the
    batch's, over N and every spatial position, and the running statistics are updated; in eval the
    running statistics are used (or the batch's when ``track_running_stats=False``).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running = (1 - momentum) * running + momentum * batch; None: cumulative average.
        affine: learn gamma (init 1) and, if ``bias``, beta (init 0).
        track_running_stats: keep running_mean / running_var / num_batches_tracked buffers.
        bias: learn beta (with ``affine``), as torch.nn's keyword-only ``bias``.
        strict: raise :class:`bnlab.functional.NonFiniteStatisticsError` naming the channels when a
            training batch's statistics are not finite. Without it such a batch leaves the running
            statistics untouched, silently.
        backend: kernel backend (see :mod:`bnlab.kernels`); None chooses automatically.

    Shape:
        input and output (N, C, *), contiguous or channels_last; ``mask`` (N, *).

    Details: normalization uses the biased batch variance, ``running_var`` the unbiased one, as
    torch.nn; see :func:`bnlab.functional.batch_norm` for the numerical choices.
    """

    expected_dims: tuple[int, ...] = ()  # empty: any rank >= 2

    def _check_input_dim(self, input: Tensor) -> None:
        if self.expected_dims and input.dim() not in self.expected_dims:
            wanted = " or ".join(f"{d}D" for d in self.expected_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")
        if input.dim() >= 2 and input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels "
                f"on dim 1, got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Normalize ``input``; an optional bool ``mask`` (N, *spatial) restricts the batch
        statistics to its True positions (see :func:`bnlab.functional.batch_norm`)."""
        self._check_input_dim(input)
        return F.batch_norm(
            input, **self._functional_args(), mask=mask, strict=self.strict, backend=self.backend
        )

    def _functional_args(self) -> dict:
        """Statistics, parameters and mode as torch.nn decides them: batch statistics in training
        or without running ones; running statistics updated only when tracked."""
        running_mean = self._registered("running_mean")
        use_running = not self.training or self.track_running_stats
        return dict(
            running_mean=running_mean if use_running else None,
            running_var=self._registered("running_var") if use_running else None,
            weight=self._registered("weight"),
            bias=self._registered("bias"),
            training=self.training or running_mean is None,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self._registered("num_batches_tracked") if use_running else None,
        )

    def _registered(self, name: str):
        """A parameter or buffer straight from its registry (nn.Module.__getattr__ made up a third
        of a small layer's Python overhead); by attribute when it is not there, e.g. a weight under
        torch.nn.utils.parametrize."""
        for registry in (self._parameters, self._buffers):
            if name in registry:
                return registry[name]
        return getattr(self, name)


class BatchNorm1d(BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; see :class:`BatchNorm`."""

    expected_dims = (2, 3)


class BatchNorm2d(BatchNorm):
    """Batch norm over (N, C, H, W) input, per channel; see :class:`BatchNorm`."""

    expected_dims = (4,)


class BatchNorm3d(BatchNorm):
    """Batch norm over (N, C, D, H, W) input, per channel; see :class:`BatchNorm`."""

    expected_dims = (5,)


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """:func:`torch.func.replace_all_batch_norm_modules_` for bnlab's batch norms too: every batch
    norm of ``root`` (torch.nn's and bnlab's) stops tracking running statistics, in place, so that
    it normalizes with batch statistics and updates nothing under vmap / grad (the torch.func
    recipe for models with batch norm). Returns ``root``."""
    torch.func.replace_all_batch_norm_modules_(root)
    for module in root.modules():
        if isinstance(module, BatchNorm) and module.track_running_stats:
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            module.track_running_stats = False
    return root
