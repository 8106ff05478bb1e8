"""bnlab: batch normalization done right, fast, in every variant, and a lab that shows why it works."""

from . import functional, kernels
from .functional import batch_norm, layer_norm

__version__ = "0.1.0"
