"""Modules: drop-in replacements for torch.nn's normalization layers."""

from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import ConversionWarning, convert, revert
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .layernorm import LayerNorm

__all__ = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm",
    "convert", "revert", "ConversionWarning",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d",
]
