"""Frozen batch norm: Algorithm 2's inference transform as a fixed affine layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.composite import accumulation_dtype, per_channel

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class FrozenBatchNorm(nn.Module):
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
        """The frozen counterpart of a bnlab or torch.nn batch norm with running statistics."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(
                f"cannot freeze {type(bn).__name__}: it has no running statistics "
                "(track_running_stats=False normalizes with batch statistics even in eval mode)"
            )
        mean, var = bn.running_mean, bn.running_var
        frozen = cls(mean.numel(), bn.eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def scale_and_shift(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """(scale, shift) of y = scale * x + shift, computed in ``dtype``."""
        scale = self.weight.to(dtype) * torch.rsqrt(self.running_var.to(dtype) + self.eps)
        return scale, self.bias.to(dtype) - self.running_mean.to(dtype) * scale

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
