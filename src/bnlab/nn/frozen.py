"""Frozen batch norm: Algorithm 2's inference transform as a fixed affine layer, alone or followed
by the drop layer and activation of a batch norm + activation module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..checks import ACTIVATIONS
from ..kernels.composite import accumulation_dtype, activate, per_channel
from .act import BatchNormAct
from .tracing import WholeWhenTraced, whole_when_traced

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "Activation",
]


class FrozenBatchNorm(WholeWhenTraced, nn.Module):
    r"""Batch norm with fixed statistics and affine parameters, all buffers (nothing to train).

    .. math::
        y = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}} x
            + \Big(\beta - \frac{\gamma\,\mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\Big)

    (Ioffe & Szegedy 2015, Algorithm 2, step 11). Its ``state_dict`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``) is torchvision's ``FrozenBatchNorm2d``'s; a BatchNorm
    checkpoint loads too (``num_batches_tracked`` is dropped).

    Shape:
        input and output (N, C, *).

    Details: one fused pass ``shift + x * scale`` (``torch.addcmul``), as a folded layer computes
    it; float32 for half inputs. For inputs whose mean is far from zero relative to their spread
    this loses about |mean| / std float32 ulps to cancellation, like every folded BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> "FrozenBatchNorm":
        """The frozen counterpart of a bnlab or torch.nn batch norm with running statistics.

        A batch norm that applies an activation or drop layer after normalizing (bnlab's
        BatchNormAct, timm's BatchNormAct2d, anything with ``act`` / ``drop`` modules) is refused
        here: :meth:`FrozenBatchNormAct.from_batch_norm` keeps them.
        """
        if not issubclass(cls, FrozenBatchNormAct) and _has_activation(bn):
            raise ValueError(
                f"{type(bn).__name__} applies an activation or drop layer after normalizing; "
                f"{cls.__name__} would drop it: use FrozenBatchNormAct.from_batch_norm"
            )
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}: it has no running statistics "
                "(track_running_stats=False normalizes with batch statistics even in eval mode)"
            )
        return cls.from_statistics(
            bn.running_mean, bn.running_var, _effective_weight(bn), bn.bias, bn.eps
        )

    @classmethod
    def from_statistics(
        cls,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        eps: float = 1e-5,
    ) -> "FrozenBatchNorm":
        """The fixed map of ``batch_norm(x, running_mean, running_var, weight, bias, eps=eps)`` in
        eval mode (copies of the tensors; weight None means 1, bias None means 0)."""
        frozen = cls(
            running_mean.numel(), eps, device=running_mean.device, dtype=running_mean.dtype
        )
        with torch.no_grad():
            frozen.running_mean.copy_(running_mean)
            frozen.running_var.copy_(running_var)
            if weight is not None:
                frozen.weight.copy_(weight)
            if bias is not None:
                frozen.bias.copy_(bias)
        return frozen

    def scale_and_shift(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """(scale, shift) of y = scale * x + shift, computed in ``dtype``."""
        scale = self.weight.to(dtype) * torch.rsqrt(self.running_var.to(dtype) + self.eps)
        return scale, self.bias.to(dtype) - self.running_mean.to(dtype) * scale

    @whole_when_traced
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects (N, {self.num_features}, *) "
                f"input, got shape {tuple(x.shape)}"
            )
        scale, shift = self.scale_and_shift(accumulation_dtype(x.dtype))
        y = torch.addcmul(per_channel(shift, x), x.to(scale.dtype), per_channel(scale, x))
        return y.to(x.dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen batch norm for (N, C) or (N, C, L) input."""


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen batch norm of (N, C, H, W) input; torchvision's FrozenBatchNorm2d checkpoints."""


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen batch norm for (N, C, D, H, W) input."""


def _effective_weight(bn: nn.Module) -> Optional[Tensor]:
    """The gamma ``bn`` normalizes with: |gamma| + eps in bnlab's in-place activated mode (Rota Bulo
    et al., CVPR 2018, section 3.2: the inversion must never divide by zero), else its weight."""
    if isinstance(bn, BatchNormAct) and bn.inplace and bn.weight is not None:
        return bn.weight.detach().abs() + bn.eps
    return bn.weight


def _has_activation(bn: nn.Module) -> bool:
    """Whether ``bn`` applies something after normalizing: a bnlab activation other than identity,
    or ``act`` / ``drop`` modules other than nn.Identity (timm's BatchNormAct2d convention)."""
    if isinstance(bn, BatchNormAct):
        return bn.activation != "identity" or bn.inplace
    return any(
        isinstance(getattr(bn, key, None), nn.Module)
        and not isinstance(getattr(bn, key), nn.Identity)
        for key in ("drop", "act")
    )


class Activation(nn.Module):
    """bnlab's activation ``activation`` (one of :data:`bnlab.functional.ACTIVATIONS`) as a module,
    computed as bnlab's BatchNormAct computes it after normalizing."""

    def __init__(self, activation: str, activation_param: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        self.activation, self.activation_param = activation, float(activation_param)

    def forward(self, x: Tensor) -> Tensor:
        return activate(x, self.activation, self.activation_param)

    def extra_repr(self) -> str:
        return f"{self.activation!r}, activation_param={self.activation_param}"


class FrozenBatchNormAct(FrozenBatchNorm):
    """A frozen batch norm, then its drop layer and activation: ``act(drop(frozen_bn(x)))``.

    What a batch norm + activation module (bnlab's BatchNormAct, timm's BatchNormAct2d) computes in
    eval mode. ``state_dict``: FrozenBatchNorm's keys, plus those of ``drop`` and ``act`` (if any),
    as in timm's FrozenBatchNormAct2d.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device=None,
        dtype=None,
        *,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(num_features, eps, device=device, dtype=dtype)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> "FrozenBatchNormAct":
        """The frozen counterpart of a batch norm followed by an activation. Keeps ``bn.drop`` and
        ``bn.act`` (the same module objects) when it has them as modules, else makes bnlab's
        string ``activation`` a module (:class:`Activation`); in-place activated batch norm's
        gamma becomes |gamma| + eps."""
        frozen = super().from_batch_norm(bn)
        if isinstance(bn, BatchNormAct) and not isinstance(getattr(bn, "act", None), nn.Module):
            frozen.act = Activation(bn.activation, bn.activation_param)
        for key in ("drop", "act"):
            if isinstance(getattr(bn, key, None), nn.Module):
                setattr(frozen, key, getattr(bn, key))
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNormAct1d(FrozenBatchNormAct, FrozenBatchNorm1d):
    """Frozen batch norm + activation for (N, C) or (N, C, L) input."""


class FrozenBatchNormAct2d(FrozenBatchNormAct, FrozenBatchNorm2d):
    """Frozen batch norm + activation for (N, C, H, W) input (timm's BatchNormAct2d frozen)."""


class FrozenBatchNormAct3d(FrozenBatchNormAct, FrozenBatchNorm3d):
    """Frozen batch norm + activation for (N, C, D, H, W) input."""
