"""Modules: drop-in replacements for torch.nn's normalization layers."""

from .act import (
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    InPlaceABN,
    InPlaceABN1d,
    InPlaceABN2d,
    InPlaceABN3d,
)
from .batchnorm import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    replace_all_batch_norm_modules_,
    set_statistics,
)
from .bnlstm import BNLSTM, BNLSTMCell
from .convert import (
    ConversionReport,
    ConversionWarning,
    convert,
    rebuild,
    register_conversion,
    revert,
)
from .dropact import BatchNormDropAct2d
from .frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
)
from .ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .layernorm import LayerNorm
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "replace_all_batch_norm_modules_",
    "set_statistics",
    "LayerNorm",
    "convert",
    "revert",
    "ConversionWarning",
    "ConversionReport",
    "register_conversion",
    "rebuild",
    "BatchNormDropAct2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "BNLSTM",
    "BNLSTMCell",
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "InPlaceABN",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
]
