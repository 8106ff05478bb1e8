"""Modules: drop-in replacements for torch.nn's normalization layers.

Everything each submodule lists in its ``__all__`` is re-exported here.
"""

from . import act, batchnorm, bnlstm, convert, dropact, frozen, fuse, ghost, layernorm, renorm, sync

_SUBMODULES = (
    batchnorm,
    layernorm,
    convert,
    dropact,
    frozen,
    fuse,
    renorm,
    ghost,
    sync,
    bnlstm,
    act,
)

from .act import *  # noqa: E402, F403
from .batchnorm import *  # noqa: E402, F403
from .bnlstm import *  # noqa: E402, F403

# from here on bnlab.nn.convert is the function, not the submodule
from .convert import *  # noqa: E402, F403
from .dropact import *  # noqa: E402, F403
from .frozen import *  # noqa: E402, F403
from .fuse import *  # noqa: E402, F403
from .ghost import *  # noqa: E402, F403
from .layernorm import *  # noqa: E402, F403
from .renorm import *  # noqa: E402, F403
from .sync import *  # noqa: E402, F403

__all__ = [name for module in _SUBMODULES for name in module.__all__]
