"""A minimal stand-in for torchvision, for importing timm where the real torchvision cannot load.

The torchvision wheel some package indexes serve is built against the CUDA build of torch and fails
to load beside the CPU build ("operator torchvision::nms does not exist"). timm's model code needs
only ``torchvision.ops.misc.FrozenBatchNorm2d``; its data pipeline names transform classes at import
time but the zoo tests never call them. :func:`import_timm` uses the real torchvision whenever it
loads and installs this stand-in only when it does not.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's semantics: fixed statistics and affine parameters,
    all buffers (``weight``, ``bias``, ``running_mean``, ``running_var``), eps 1e-5, and
    ``num_batches_tracked`` dropped when a state_dict is loaded."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"  # where it stands in, as bnlab names it


class _Placeholder:
    """Any transform class or enum member timm names at import time; never called by the tests."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stand-in: transforms are not available")

    def __class_getitem__(cls, item):
        return cls


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {})
        setattr(self, name, placeholder)
        return placeholder


class _InterpolationMode:
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any other ``torchvision.*`` submodule (datasets, models, io, ...) as placeholders."""

    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision.") and sys.modules.get("torchvision") is not None:
            if getattr(sys.modules["torchvision"], "standin", False):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _module(name: str, cls: type = types.ModuleType, **attrs) -> types.ModuleType:
    module = cls(name)
    module.__path__ = []  # a package, so that submodules import
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install() -> None:
    """Put the stand-in into ``sys.modules`` (torchvision, .ops.misc, .transforms, ...)."""
    root = _module("torchvision", __version__="0.0.0+standin", standin=True)
    misc = _module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    root.ops = _module("torchvision.ops", misc=misc, FrozenBatchNorm2d=FrozenBatchNorm2d)
    functional = _module(
        "torchvision.transforms.functional",
        _PlaceholderModule,
        InterpolationMode=_InterpolationMode,
    )
    transforms = _module(
        "torchvision.transforms",
        _PlaceholderModule,
        functional=functional,
        InterpolationMode=_InterpolationMode,
    )
    root.transforms = transforms
    if not any(isinstance(finder, _PlaceholderFinder) for finder in sys.meta_path):
        sys.meta_path.append(_PlaceholderFinder())


def import_timm():
    """Import timm with the real torchvision if it loads, else with the stand-in."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or the CUDA wheel's RuntimeError on a CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        install()
    return importlib.import_module("timm")
