"""Swap torch.nn normalization layers for bnlab's (``convert``) and back (``revert``).

The swap keeps every piece of state: the very same Parameter and buffer tensors (so optimizers built
before the swap keep working, and device, dtype and requires_grad are untouched), train/eval mode,
registered hooks and any extra attributes. Only exact torch.nn classes are swapped: subclasses (and
classes with no counterpart, e.g. SyncBatchNorm or the lazy modules) are left as they are and
reported in one :class:`ConversionWarning`.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layernorm import LayerNorm

__all__ = ["convert", "revert", "ConversionWarning"]

_TO_BNLAB = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm,
}
_TO_TORCH = {bnlab: torch_cls for torch_cls, bnlab in _TO_BNLAB.items()}
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
_BNLAB_NORMS = (BatchNorm, LayerNorm)
_BNLAB_ONLY_OPTIONS = ("strict", "backend")
_STATE_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class ConversionWarning(UserWarning):
    """Normalization layers that convert/revert left unchanged, and why."""


def convert(model: nn.Module) -> nn.Module:
    """Replace every torch.nn BatchNorm1d/2d/3d and LayerNorm in ``model`` by bnlab's, in place.

    Returns the model (a new module when ``model`` itself is such a layer). Subclasses and other
    normalization layers bnlab does not know are left untouched and listed in a ConversionWarning.
    """
    return _swap(model, _TO_BNLAB, _TORCH_NORMS, "convert")


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: bnlab BatchNorm1d/2d/3d and LayerNorm become torch.nn's, with their state.

    bnlab-only settings (``strict``, ``backend``) are dropped; modules with no torch.nn
    counterpart (e.g. the rank-agnostic ``bnlab.nn.BatchNorm``) are left and reported.
    """
    return _swap(model, _TO_TORCH, _BNLAB_NORMS, "revert")


def _swap(model: nn.Module, mapping: dict, family: tuple, verb: str) -> nn.Module:
    skipped: list[str] = []
    swapped: dict[int, nn.Module] = {}  # a layer used at several places stays one layer
    root = _swap_one(model, mapping, family, "<root>", skipped, swapped)
    if root is not model:
        model = root
    else:
        for name, parent in list(model.named_modules()):
            # _modules, not named_children(): that one skips a child already seen at another place
            for child_name, child in list(parent._modules.items()):
                if child is None:
                    continue
                qualified = f"{name}.{child_name}" if name else child_name
                new = _swap_one(child, mapping, family, qualified, skipped, swapped)
                if new is not child:
                    setattr(parent, child_name, new)
    if skipped:
        warnings.warn(
            f"bnlab.{verb} left {len(skipped)} normalization layer(s) unchanged: "
            + "; ".join(skipped),
            ConversionWarning,
            stacklevel=3,
        )
    return model


def _swap_one(module: nn.Module, mapping: dict, family: tuple, name: str, skipped: list,
              swapped: dict) -> nn.Module:
    target = mapping.get(type(module))
    if target is None:
        if isinstance(module, family):
            skipped.append(f"{name} ({type(module).__module__}.{type(module).__qualname__}: no exact "
                           "counterpart)")
        return module
    if id(module) not in swapped:
        swapped[id(module)] = _rebuild(module, target)
    return swapped[id(module)]


def _rebuild(old: nn.Module, target: type) -> nn.Module:
    """A ``target`` instance that takes over old's whole state: tensors, mode, hooks, attributes.

    The parameter and buffer containers are copied shallowly (the new module holds the very same
    tensors); everything else, hook dicts included, is handed over as is, so hook handles taken
    before the swap still remove their hooks. bnlab's own options are class-level defaults on bnlab
    modules, and are dropped when going back to torch.nn.
    """
    new = target.__new__(target)
    new.__dict__.update(vars(old))
    for key in _STATE_CONTAINERS:
        new.__dict__[key] = copy.copy(vars(old)[key])
    if target in _TO_BNLAB:  # back to torch.nn
        for key in _BNLAB_ONLY_OPTIONS:
            new.__dict__.pop(key, None)
    return new
