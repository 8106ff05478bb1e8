"""bnlab: batch normalization done right, fast, in every variant, and a lab that shows why."""

from . import functional, interop, kernels, nn
from .doctor import diagnose
from .functional import NonFiniteStatisticsError, batch_norm, layer_norm
from .nn import ConversionWarning, convert, convert_sync_batchnorm, revert
from .statistics import accumulate

__version__ = "0.1.0"

__all__ = [
    "functional",
    "interop",
    "kernels",
    "nn",
    "batch_norm",
    "layer_norm",
    "convert",
    "revert",
    "ConversionWarning",
    "NonFiniteStatisticsError",
    "convert_sync_batchnorm",
    "accumulate",
    "diagnose",
]
