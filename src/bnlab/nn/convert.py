"""Swap the ecosystem's normalization layers for bnlab's (``convert``) and back (``revert``).

The swap keeps every piece of state: the very same Parameter and buffer tensors (so optimizers built
before the swap keep working, and device, dtype and requires_grad are untouched), train/eval mode,
registered hooks, child modules and any extra attributes. What converts to what is a registry,
open to users through :func:`register_conversion`; bnlab registers its own conversions with it:

- torch.nn BatchNorm1d/2d/3d and LayerNorm -> bnlab's;
- torch.nn.SyncBatchNorm -> :class:`bnlab.nn.BatchNorm` (any rank), for one-process use: it no
  longer synchronizes statistics across processes (reported; see
  :func:`bnlab.nn.convert_sync_batchnorm` for that), and revert gives the SyncBatchNorm back
  (PyTorch itself has no way back from SyncBatchNorm, pytorch/pytorch#41081);
- timm's ``BatchNormAct2d`` (and ``SyncBatchNormAct``, for one-process use) ->
  :class:`bnlab.nn.BatchNormDropAct2d`, keeping its ``drop`` and ``act`` modules;
- torchvision's ``FrozenBatchNorm2d`` (which timm uses too) -> :class:`bnlab.nn.FrozenBatchNorm2d`,
  timm's ``FrozenBatchNormAct2d`` -> :class:`bnlab.nn.FrozenBatchNormAct2d` (drop and act kept).

timm's and torchvision's classes are registered by qualified name: bnlab imports neither.
Everything convert does and leaves is counted, per class, in a :class:`ConversionReport`.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from torch import nn

from .batchnorm import EAGER_PLAN, BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .dropact import BatchNormDropAct2d, qualified_name
from .frozen import FrozenBatchNorm2d, FrozenBatchNormAct2d
from .layernorm import LayerNorm

__all__ = [
    "convert",
    "revert",
    "register_conversion",
    "ConversionReport",
    "ConversionWarning",
    "replace_modules",
    "rebuild",
    "warn_unchanged",
]

_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm)  # reported when left
_BNLAB_NORMS = (BatchNorm, LayerNorm)
_BNLAB_ONLY_OPTIONS = ("strict", "backend")
_STATE_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_ORIGIN = "_bnlab_converted_from"  # instance attribute of a converted module: its original class
_ADDED = "_bnlab_added_attributes"  # attributes a conversion added, removed again by revert
_NAMES_SHOWN = 3  # layer names a report line shows per class


class ConversionWarning(UserWarning):
    """Normalization layers convert/revert left unchanged, or changed with a caveat, and why."""


@dataclass(frozen=True)
class _Conversion:
    # None: a class bnlab knows and leaves, ``note`` says why
    to_bnlab: Optional[Callable[[nn.Module], nn.Module]]
    to_original: Optional[Callable[[nn.Module, type], nn.Module]]
    note: str = ""
    warn: bool = False  # a conversion whose caveat the user must hear about
    detail: Optional[Callable[[nn.Module], str]] = None  # per layer, e.g. which activation fused


_REGISTRY: dict[Union[type, str], _Conversion] = {}


def register_conversion(
    original: Union[type, str],
    to_bnlab: Callable[[nn.Module], nn.Module],
    to_original: Optional[Callable[[nn.Module, type], nn.Module]] = None,
    *,
    note: str = "",
) -> None:
    """Teach :func:`convert` (and :func:`revert`) a normalization class.

    Args:
        original: the class, or its qualified name ``"package.module.Class"`` (to name a class
            without importing its package, e.g. ``"mmcv.cnn.bricks.norm.SomeNorm"``).
        to_bnlab: ``module -> replacement``, the bnlab module that takes over. :func:`rebuild`
            moves the very same tensors, hooks, children and attributes into a new class:
            ``lambda m: rebuild(m, bnlab.nn.BatchNorm2d)``.
        to_original: ``(module, original_class) -> module`` for :func:`revert`, given the bnlab
            module and the class it was converted from; :func:`rebuild` itself fits. None: revert
            leaves such modules, and says so.
        note: shown beside the class in the report (e.g. a caveat).

    Lookup, for a module of class C: C itself, by class then by qualified name; else C's nearest
    registered base class B, whose conversion is used only when the classes between C and B define
    no method other than ``__init__`` (a subclass that only sets up a B differently; revert gives
    back a C). A subclass with methods of its own (``forward``, ...) may compute something else: it
    is left and reported, naming them. Registering a class again replaces its conversion.
    """
    if not (isinstance(original, str) and "." in original) and not (
        isinstance(original, type) and issubclass(original, nn.Module)
    ):
        raise TypeError(
            "original must be an nn.Module subclass or its qualified name 'package.module.Class', "
            f"got {original!r}"
        )
    for name, fn in (("to_bnlab", to_bnlab), ("to_original", to_original)):
        if not callable(fn) and not (name == "to_original" and fn is None):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    _REGISTRY[original] = _Conversion(to_bnlab, to_original, note)


@dataclass
class ClassCount:
    """One class's line in a :class:`ConversionReport`."""

    source: str  # qualified name of the class the layers had
    target: str  # qualified name of the class they have now ("" when left)
    layers: list[str] = field(default_factory=list)  # their names in the model
    note: str = ""  # why left, or the conversion's caveat
    details: Counter = field(default_factory=Counter)  # per-layer detail, counted
    warn: bool = False  # a caveat the user must hear about (converted layers)

    def line(self) -> str:
        names = _shown(self.layers)
        what = f"{len(self.layers)} x {self.source}" + (f" -> {self.target}" if self.target else "")
        extra = [self.note] if self.note else []
        extra += [f"{d}: {n}" for d, n in sorted(self.details.items())]
        return f"{what} ({names})" + (": " + "; ".join(extra) if extra else "")


@dataclass
class ConversionReport:
    """What :func:`convert` or :func:`revert` did: layers converted and left, grouped by class."""

    operation: str
    converted: dict[str, ClassCount] = field(default_factory=dict)
    left: dict[str, ClassCount] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)  # "bn -> act" pairs (fuse_activations=True)
    inplace_abn: list[str] = field(default_factory=list)  # "bn[ -> act]" (inplace_abn=True)
    residual: list[str] = field(default_factory=list)  # "bn + add -> act" (forwards rewritten)
    concat: list[str] = field(default_factory=list)  # "cat -> bn" (forwards rewritten)
    not_fused: Optional[str] = None  # why no activation was fused, when fusing was asked for

    @property
    def num_converted(self) -> int:
        return sum(len(c.layers) for c in self.converted.values())

    @property
    def num_left(self) -> int:
        return sum(len(c.layers) for c in self.left.values())

    def add(
        self, name: str, old: type, new: Optional[type], note: str, detail="", warn=False
    ) -> None:
        """Count layer ``name``, of class ``old``, as converted to ``new`` (None: left)."""
        group = self.converted if new is not None else self.left
        key = qualified_name(old)
        target = qualified_name(new) if new is not None else ""
        count = group.setdefault(key, ClassCount(key, target, note=note, warn=warn))
        count.layers.append(name)
        if detail:
            count.details[detail] += 1

    def __str__(self) -> str:
        lines = [f"{self.operation}: {self.num_converted} converted, {self.num_left} left"]
        lines += ["  converted " + c.line() for c in self.converted.values()]
        lines += ["  left " + c.line() for c in self.left.values()]
        if self.fused:
            count = len(self.fused)
            lines.append(
                f"  fused {count} activation(s) into their batch norm ({_shown(self.fused)})"
            )
        if self.inplace_abn:
            lines.append("  " + _inplace_line(self.inplace_abn))
        if self.residual:
            lines.append("  " + _residual_line(self.residual))
        if self.concat:
            lines.append("  " + _concat_line(self.concat))
        if self.not_fused:
            lines.append(f"  no activation fused: {self.not_fused}")
        return "\n".join(lines)


def convert(
    model: nn.Module,
    *,
    report: bool = False,
    fuse_activations: bool = False,
    inplace_abn: bool = False,
):
    """Replace every normalization layer of ``model`` that bnlab knows by bnlab's, in place.

    Returns the model (a new module when ``model`` itself is such a layer), or ``(model,
    ConversionReport)`` with ``report=True``. Layers left unchanged (normalization classes with no
    registered conversion, subclasses with methods of their own) and conversions with a caveat
    (one-process use of a SyncBatchNorm) are listed, one line per class, in one ConversionWarning.

    ``fuse_activations``: also fuse each batch norm with the ReLU / LeakyReLU module that follows
    it, where the model's torch.fx graph shows nothing else sees the pair (see
    :mod:`bnlab.nn.fuse`); the pairs fused are in the report's ``fused``. And each residual unit's
    end written in a block's forward, ``x = bn(x); x += shortcut; x = act(x)`` (timm's and
    torchvision's ResNet blocks), becomes one op (:meth:`bnlab.nn.BatchNorm.add_act`): that
    block's forward is rewritten on the instance (its class, state and ``state_dict`` unchanged;
    revert restores it), listed in the report's ``residual``; so is each batch norm of a
    concatenation written in a block's forward, ``bn(torch.cat(features, 1))`` (DenseNet's
    layers), which then reads the features from one buffer the block's layers share
    (:meth:`bnlab.nn.BatchNorm.concat`), listed in ``concat``. A model fx cannot trace is
    converted without fusing, and the warning says why.

    ``inplace_abn``: in-place activated batch norm (Rota Bulo et al. 2018) for each batch norm that
    reads a convolution's or linear layer's output alone: the output overwrites that input and is
    all the backward keeps, which frees one activation-sized tensor per layer. This changes the
    model's function, as in the paper, and the warning says so: gamma enters as |gamma| + eps,
    and a ReLU after the batch norm becomes leaky_relu(0.01) (in-place needs an invertible
    activation). Residual units as with ``fuse_activations``, in place: the block's output is
    written over the batch norm's input, and only it and the shortcut are kept. For training from
    scratch; the layers are in the report's ``inplace_abn`` (residual units in ``residual`` too).
    """
    model, result = _swap_all(model, "bnlab.convert", _convert_one, True, warn=False)
    if inplace_abn or fuse_activations:
        from .fuse import fuse_activations as fuse  # fuse builds on this module's walker
    if inplace_abn:
        result.inplace_abn, units, _, result.not_fused = fuse(model, inplace=True)
        result.inplace_abn += units
        result.residual += units
    if fuse_activations and not result.not_fused:
        result.fused, units, result.concat, result.not_fused = fuse(model)
        result.residual += units
    _warn(result, stacklevel=3)  # _warn, convert, its caller
    return (model, result) if report else model


def revert(model: nn.Module, *, report: bool = False):
    """Undo :func:`convert`: each converted module becomes its original class again, state and all;
    bnlab BatchNorm1d/2d/3d and LayerNorm built directly become torch.nn's.

    bnlab-only settings (``strict``, ``backend``) are dropped; modules with no way back (e.g. the
    rank-agnostic ``bnlab.nn.BatchNorm`` built directly) are left and reported. Returns as
    :func:`convert` does.
    """
    return _swap_all(model, "bnlab.revert", _revert_one, report)


def _swap_all(
    model: nn.Module, operation: str, swap_one: Callable, report: bool, warn: bool = True
):
    result = ConversionReport(operation)
    model = replace_modules(model, lambda module, name: swap_one(module, name, result))
    if warn:
        _warn(result)
    return (model, result) if report else model


def _lookup(cls: type) -> tuple[Optional[type], Optional[_Conversion]]:
    """The nearest class in cls's MRO with a registered conversion, and that conversion."""
    for base in cls.__mro__:
        entry = _REGISTRY.get(base) or _REGISTRY.get(qualified_name(base))
        if entry is not None:
            return base, entry
    return None, None


def _own_methods(cls: type, base: type) -> list[str]:
    """Methods (other than __init__) the classes between cls and its base ``base`` define."""
    names: list[str] = []
    for klass in cls.__mro__[: cls.__mro__.index(base)]:
        for name, value in vars(klass).items():
            method = callable(value) or isinstance(value, (property, classmethod, staticmethod))
            if method and name != "__init__" and not isinstance(value, type) and name not in names:
                names.append(name)
    return names


def _convert_one(module: nn.Module, name: str, result: ConversionReport) -> nn.Module:
    cls = type(module)
    base, entry = _lookup(cls)
    if entry is None:
        if isinstance(module, _TORCH_NORMS):
            result.add(name, cls, None, "no registered conversion")
        return module
    if entry.to_bnlab is None:
        result.add(name, cls, None, entry.note)
        return module
    methods = ", ".join(_own_methods(cls, base)) if base is not cls else ""
    if methods:
        why = f"a subclass of {qualified_name(base)} that defines {methods}, which bnlab "
        result.add(name, cls, None, why + "cannot take over; see bnlab.nn.register_conversion")
        return module
    new = entry.to_bnlab(module)
    new.__dict__[_ORIGIN] = cls
    notes = [entry.note] if entry.note else []
    if base is not cls:
        notes.append(f"converted as its base {qualified_name(base)}")
    detail = entry.detail(new) if entry.detail else ""
    result.add(name, cls, type(new), "; ".join(notes), detail, entry.warn)
    return new


def _revert_one(module: nn.Module, name: str, result: ConversionReport) -> nn.Module:
    from .fuse import UNFUSED, FusedActivation, ResidualForward

    if isinstance(vars(module).get("forward"), ResidualForward):  # the block's own forward back
        del module.__dict__["forward"]

    if isinstance(module, FusedActivation):  # the activation module fused into a batch norm
        return module.original
    unfused = vars(module).get(UNFUSED)
    if unfused is not None:  # first the batch norm it was before fusing
        module = rebuild(module, unfused)
        for key in (UNFUSED, "activation", "activation_param", "inplace"):
            module.__dict__.pop(key, None)
    origin = vars(module).get(_ORIGIN)
    if origin is None:
        target = _BNLAB_TO_TORCH.get(type(module))
        if target is not None:
            new = rebuild(module, target)
            result.add(name, type(module), target, "")
            return new
        if isinstance(module, _BNLAB_NORMS):
            result.add(name, type(module), None, "no torch.nn counterpart")
        return module
    _, entry = _lookup(origin)
    if entry is None or entry.to_original is None:
        result.add(name, type(module), None, f"converted from {qualified_name(origin)}, no revert")
        return module
    new = entry.to_original(module, origin)
    for key in (_ORIGIN, _ADDED, *vars(module).get(_ADDED, ())):
        new.__dict__.pop(key, None)
        if new is not module:  # rebuild copied the child registry: drop the children added
            new._modules.pop(key, None)
    result.add(name, type(module), type(new), "")
    return new


def _warn(result: ConversionReport, stacklevel: int = 4) -> None:
    """One ConversionWarning, pointing at the caller of convert/revert: the classes left, and
    conversions with a caveat, a line each."""
    caveats = [c for c in result.converted.values() if c.warn]
    lines = [f"left {c.line()}" for c in result.left.values()]
    lines += [f"converted {c.line()}" for c in caveats]
    if result.inplace_abn:
        lines.append(_inplace_line(result.inplace_abn))
    if result.not_fused:
        lines.append(f"fused no activation: {result.not_fused}")
    if lines:
        head = f"{result.operation} left {result.num_left} normalization layer(s) unchanged"
        if caveats:
            head += f" and converted {sum(len(c.layers) for c in caveats)} with a caveat"
        if result.inplace_abn:
            head += f"; {len(result.inplace_abn)} now compute another function"
        warnings.warn(
            "\n  ".join([head + "; by class:", *lines]),
            ConversionWarning,
            stacklevel=stacklevel,  # _warn, _swap_all, revert, its caller
        )


def _shown(names: list[str]) -> str:
    """The first few of ``names``, and "..." when there are more."""
    return ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")


def _residual_line(units: list[str]) -> str:
    blocks = sorted({unit.split(" + ")[0].rpartition(".")[0] or "<root>" for unit in units})
    return (
        f"fused {len(units)} residual addition(s) and their activation into the batch norm before "
        f"them ({_shown(units)}): the forward of {len(blocks)} block(s) ({_shown(blocks)}) now "
        "calls bnlab.nn.fuse.residual_unit (bnlab.revert gives their own forward back)"
    )


def _concat_line(units: list[str]) -> str:
    blocks = sorted({unit.partition(" -> ")[2].rpartition(".")[0] or "<root>" for unit in units})
    return (
        f"{len(units)} batch norm(s) of a concatenation now read it from a buffer their block's "
        f"layers share ({_shown(units)}): the forward of {len(blocks)} block(s) "
        f"({_shown(blocks)}) calls bnlab.nn.fuse.concat_unit (bnlab.revert gives their own "
        "forward back)"
    )


def _inplace_line(layers: list[str]) -> str:
    relus = sum("->" in layer for layer in layers)
    return (
        f"made {len(layers)} batch norm(s) in-place activated ({_shown(layers)}), which changes "
        f"the model's function: gamma enters as |gamma| + eps, and {relus} activation(s) after "
        "them run as leaky_relu (a ReLU with slope 0.01)"
    )


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
    tensors); everything else, hook dicts and child modules included, is handed over as is, so hook
    handles taken before the swap still remove their hooks. bnlab's own options are class-level
    defaults on bnlab modules, and are dropped when going to a class that has no such options.
    """
    new = target.__new__(target)
    new.__dict__.update(vars(old))
    new.__dict__.pop(EAGER_PLAN, None)  # decided for old's class
    for key in _STATE_CONTAINERS:
        new.__dict__[key] = copy.copy(vars(old)[key])
    if not hasattr(target, "backend"):  # not a bnlab class
        for key in _BNLAB_ONLY_OPTIONS:
            new.__dict__.pop(key, None)
    return new


# ------------------------------------------------------------------------ bnlab's own conversions

_BNLAB_TO_TORCH = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
    LayerNorm: nn.LayerNorm,
}
_ONE_PROCESS = (
    "for one-process use: statistics are no longer synchronized across processes "
    "(bnlab.nn.convert_sync_batchnorm does that); revert gives it back"
)


def _to(target: type) -> Callable[[nn.Module], nn.Module]:
    return lambda module: rebuild(module, target)


def _to_drop_act(module: nn.Module) -> nn.Module:
    """timm's BatchNormAct2d / SyncBatchNormAct -> BatchNormDropAct2d with the same drop and act
    objects (a SyncBatchNormAct built directly may lack them: it then has none, as timm's)."""
    new = rebuild(module, BatchNormDropAct2d)
    added = tuple(key for key in ("drop", "act") if key not in new._modules)
    for key in added:
        new._modules[key] = nn.Identity()
    if added:
        new.__dict__[_ADDED] = added  # revert removes them again
    return new


def _fused_detail(module: nn.Module) -> str:
    fused = module.fused()
    act = type(module.act).__name__
    return f"{act} fused as {fused[0]}" if fused else f"{act} runs after bnlab's batch norm"


def _frozen_as(target: type) -> Callable[[nn.Module], nn.Module]:
    """torchvision's and timm's frozen batch norms keep no num_features; bnlab's read it (and
    revert drops it again)."""

    def to_frozen(module: nn.Module) -> nn.Module:
        new = rebuild(module, target)
        if "num_features" not in vars(new):
            new.num_features = new.weight.numel()
            new.__dict__[_ADDED] = ("num_features",)
        return new

    return to_frozen


def _register_builtin() -> None:
    for bnlab_cls, torch_cls in _BNLAB_TO_TORCH.items():
        register_conversion(torch_cls, _to(bnlab_cls), rebuild)
    _REGISTRY[nn.SyncBatchNorm] = _Conversion(_to(BatchNorm), rebuild, _ONE_PROCESS, warn=True)
    _REGISTRY["timm.layers.norm_act.BatchNormAct2d"] = _Conversion(
        _to_drop_act, rebuild, "drop and act kept", detail=_fused_detail
    )
    _REGISTRY["timm.layers.norm_act.SyncBatchNormAct"] = _Conversion(
        _to_drop_act, rebuild, _ONE_PROCESS, warn=True, detail=_fused_detail
    )
    register_conversion(
        "torchvision.ops.misc.FrozenBatchNorm2d", _frozen_as(FrozenBatchNorm2d), rebuild
    )
    _REGISTRY["timm.layers.norm_act.FrozenBatchNormAct2d"] = _Conversion(
        _frozen_as(FrozenBatchNormAct2d), rebuild, "drop and act kept"
    )


_register_builtin()
