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
from typing import Callable

from torch import nn

from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layernorm import LayerNorm

__all__ = ["convert", "revert", "ConversionWarning", "replace_modules", "rebuild", "warn_unchanged"]

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
    """Undo :func:`convert`: bnlab BatchNorm1d/2d/3d and LayerNorm become torch.nn's, state and all.

    bnlab-only settings (``strict``, ``backend``) are dropped; modules with no torch.nn
    counterpart (e.g. the rank-agnostic ``bnlab.nn.BatchNorm``) are left and reported.
    """
    return _swap(model, _TO_TORCH, _BNLAB_NORMS, "revert")


def replace_modules(model: nn.Module, replace: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """Offer every module of ``model`` (the root included), once each, with its qualified name
    ("<root>" for the root) to ``replace``; a module it answers with another is replaced by that
    one at every place it appears (a layer used at several places stays one layer).

    Returns the model, or ``replace``'s answer for the root when that is another module (then
    nothing below it is visited).
    """
    answers: dict[int, nn.Module] = {}

    def answer(module: nn.Module, name: str) -> nn.Module:
        if id(module) not in answers:
            answers[id(module)] = replace(module, name)
        return answers[id(module)]

    root = answer(model, "<root>")
    if root is not model:
        return root
    for name, parent in list(model.named_modules()):
        # _modules, not named_children(): that one skips a child already seen at another place
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                new = answer(child, f"{name}.{child_name}" if name else child_name)
                if new is not child:
                    setattr(parent, child_name, new)
    return model


def _swap(model: nn.Module, mapping: dict, family: tuple, verb: str) -> nn.Module:
    skipped: list[str] = []

    def swap(module: nn.Module, name: str) -> nn.Module:
        target = mapping.get(type(module))
        if target is not None:
            return rebuild(module, target)
        if isinstance(module, family):
            skipped.append(
                f"{name} ({type(module).__module__}.{type(module).__qualname__}: no "
                "exact counterpart)"
            )
        return module

    model = replace_modules(model, swap)
    warn_unchanged(f"bnlab.{verb}", "normalization", skipped, stacklevel=4)
    return model


def warn_unchanged(operation: str, kind: str, skipped: list[str], stacklevel: int) -> None:
    """One :class:`ConversionWarning` listing the layers ``operation`` left as they were (if any);
    ``stacklevel`` as :func:`warnings.warn`'s, counted from the caller of this function."""
    if skipped:
        warnings.warn(
            f"{operation} left {len(skipped)} {kind} layer(s) unchanged: " + "; ".join(skipped),
            ConversionWarning,
            stacklevel=stacklevel,
        )


def rebuild(old: nn.Module, target: type) -> nn.Module:
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
