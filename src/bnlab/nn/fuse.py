"""Batch norm fused with the activation module after it: ``convert(model, fuse_activations=True)``.

Most models call their activation as a module of its own after the batch norm (``self.bn1(x)``
then ``self.act1(x)``). Found in the model's torch.fx graph, such a pair becomes one
:class:`bnlab.nn.BatchNormAct` (the same parameters, buffers and ``state_dict`` keys) followed by a
:class:`FusedActivation` that passes its input through: one pass over memory each way instead of
two, and one activation-sized tensor fewer kept for the backward. :func:`bnlab.revert` undoes it.

A pair is fused only where nothing else can see the difference: the batch norm's output goes to
the activation alone, each module is called exactly once in the whole forward, neither has hooks,
and the activation is one bnlab's kernels run fused and fast (ReLU, LeakyReLU); identity modules
between the two (timm's disabled drop-block) stay where they are. Everything else is left as it
was.

Residual units (He et al. 2016): a block whose forward ends ``x = bn(x); x += shortcut;
x = act(x)`` gets, on the instance, a forward generated from its own torch.fx graph in which those
three steps are one :func:`residual_unit` call (:class:`ResidualForward`): one normalizing pass
reads x and the shortcut and writes the activated sum, where batch norm, the addition and the
activation made three (ResNet-50's 16 bottlenecks; measured in benchmarks/model_speed.py).

Dense layers (Huang et al. 2017): a block whose forward normalizes a concatenation,
``bn(torch.cat(features, 1))`` (timm's and torchvision's DenseNet layers), gets the same kind of
forward with that step one :func:`concat_unit` call (:meth:`bnlab.nn.BatchNorm.concat`): the
features are kept in one buffer the block's layers share instead of a new concatenation per
layer (Pleiss et al. 2017, section 3).
"""

from __future__ import annotations

import copy
import inspect
import operator
import types
from collections import Counter
from typing import Callable, Optional

import torch
from torch import fx, nn

from ..functional import check_activation
from .act import BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import rebuild, replace_modules
from .dropact import has_hooks

__all__ = ["FusedActivation", "ResidualForward", "concat_unit", "residual_unit"]
# fusing itself: bnlab.convert(model, fuse_activations=True)

_FUSED_CLASS = {
    BatchNorm: BatchNormAct,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}
_ACTIVATIONS = {
    nn.ReLU: lambda module: ("relu", None),
    nn.LeakyReLU: lambda module: ("leaky_relu", float(module.negative_slope)),
}
UNFUSED = "_bnlab_unfused_from"  # a fused batch norm's class before fusion (for revert)


class FusedActivation(nn.Identity):
    """Where an activation module was whose work the batch norm before it now does: passes its
    input through. ``original`` (not a child: ``state_dict`` is unchanged) is what revert puts
    back; ``into`` names the batch norm."""

    def __init__(self, original: nn.Module, into: str) -> None:
        super().__init__()
        self.__dict__["original"] = original
        self.into = into

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__} fused into {self.into}"


class LayerTracer(fx.Tracer):
    """torch.nn's layers and bnlab's modules stay whole (call_module nodes); every other module,
    bnlab's own containers included, is traced into. A block whose forward bnlab rewrote
    (:class:`ResidualForward`) is traced through its class's own forward, which computes the same;
    in the in-place mode, which computes another function, it stays whole."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        rewritten = vars(m).get("forward")
        if isinstance(rewritten, ResidualForward):
            return rewritten.inplace
        return type(m).__module__.startswith("bnlab.nn.") or super().is_leaf_module(
            m, qualified_name
        )

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        if isinstance(vars(m).get("forward"), ResidualForward):
            forward = types.MethodType(type(m).forward, m)
        return super().call_module(m, forward, args, kwargs)


def fuse_activations(
    model: nn.Module, inplace: bool = False
) -> tuple[list[str], list[str], list[str], Optional[str]]:
    """Fuse, in place, every bnlab batch norm of ``model`` with the activation module after it
    where that changes nothing else (see the module's text), every residual unit's end,
    ``act(bn(x) + shortcut)`` written in a block's forward, into one op, and every batch norm of a
    concatenation written in a block's forward into :func:`concat_unit` (see
    :func:`_rewrite_blocks`). Returns what was fused ("bn -> act" names, or the batch norm's
    alone), the residual units ("bn + add -> act"), the concatenations ("cat -> bn") and, if the
    model could not be traced, why (nothing is fused then).

    ``inplace``: in-place activated batch norm instead (Rota Bulo et al. 2018): for each batch norm
    whose input is a convolution's or linear layer's output that nothing else reads (those layers
    keep their input for the backward, not their output), and whose output (or its activation's)
    goes only to layers that do not write over it (convolutions, linear, pooling), the output is
    written over that input and only it is kept for the backward. Only where that saves a tensor:
    an activation follows, or a reader keeps the output for its own backward (not average
    pooling alone). That changes the model's function, as in the paper: gamma enters as
    |gamma| + eps, and a ReLU after it becomes leaky_relu with slope 0.01 (the activation must be
    invertible); a batch norm with no
    activation after it fuses the identity.
    """
    try:
        graph = LayerTracer().trace(model)
    except Exception as error:  # fx cannot trace data-dependent control flow and more
        return [], [], [], f"torch.fx cannot trace the model ({type(error).__name__}: {error})"
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    fused, swaps = [], {}  # swaps: id of a module -> what takes its places
    for node in graph.nodes:
        if not _plain_batch_norm(node, modules, calls):
            continue
        act_node = _activation_after(node, modules, calls)
        last = node if act_node is None else act_node
        if inplace and not (
            _overwritable_input(node, modules)
            and _read_only_by_layers(last, modules)
            and (act_node is not None or _kept_by_a_reader(node, modules))
        ):
            continue  # unsafe, or nothing to save: another function for no memory
        if act_node is None and not inplace:
            continue
        bn = modules[node.target]
        act = None if act_node is None else modules[act_node.target]
        activation = ("identity", None) if act is None else _ACTIVATIONS[type(act)](act)
        if inplace:
            activation = _invertible(*activation)
        new = rebuild(bn, _FUSED_CLASS[type(bn)])
        new.activation, new.activation_param = check_activation(*activation, inplace)
        new.__dict__[UNFUSED] = type(bn)
        if inplace:
            new.inplace = True
        swaps[id(bn)] = new
        if act is not None:
            swaps[id(act)] = FusedActivation(act, node.target)
        fused.append(node.target + ("" if act_node is None else f" -> {act_node.target}"))
    replace_modules(model, lambda module, name: swaps.get(id(module), module))
    units, concats = _rewrite_blocks(model, graph, modules, calls, inplace)
    return fused, units, concats, None


_INPLACE_RELU_SLOPE = 0.01  # Rota Bulo et al. 2018, section 3: leaky ReLU in place of ReLU


def _invertible(activation: str, param: Optional[float]) -> tuple[str, Optional[float]]:
    """The activation the in-place mode runs for ``activation``: a ReLU becomes leaky."""
    return ("leaky_relu", _INPLACE_RELU_SLOPE) if activation == "relu" else (activation, param)


def _plain_batch_norm(node: fx.Node, modules: dict, calls: Counter) -> bool:
    """A call of a bnlab batch norm of a plain class, called once, unhooked."""
    if node.op != "call_module" or type(modules[node.target]) not in _FUSED_CLASS:
        return False
    bn = modules[node.target]
    return calls[id(bn)] == 1 and not has_hooks(bn)


def _activation_after(node: fx.Node, modules: dict, calls: Counter) -> Optional[fx.Node]:
    """The activation module's node that alone reads ``node``'s output (through identity modules
    such as timm's disabled drop_block), each called once and unhooked; or None."""
    path = []
    user = _only_user(node)
    while user is not None and type(modules[user.target]) is nn.Identity:
        path.append(modules[user.target])
        user = _only_user(user)
    if user is None or type(modules[user.target]) not in _ACTIVATIONS:
        return None
    path.append(modules[user.target])
    if any(calls[id(m)] != 1 or has_hooks(m) for m in path):
        return None
    return user


def _overwritable_input(node: fx.Node, modules: dict) -> bool:
    """Whether the batch norm's input is a layer's output that only it reads, from a layer whose
    backward does not need its output (convolutions and linear layers keep their input)."""
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return False
    return isinstance(modules[source.target], _KEEP_THEIR_INPUT) and list(source.users) == [node]


_KEEP_THEIR_INPUT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _read_only_by_layers(
    node: fx.Node, modules: dict, additions: bool = False, besides: Optional[fx.Node] = None
) -> bool:
    """Whether only layers that never write over their input read ``node``'s output (directly or
    through identity modules): the in-place mode keeps that output for its backward. fx records
    ``x += y`` as an addition, so anything but these layers counts as a possible writer; with
    ``additions``, an addition that takes the output as its second operand only (``x += node``
    writes over x) is a reader too. ``besides``: a user not counted."""
    for user in node.users:
        if user is besides:
            continue
        if additions and user.op == "call_function" and user.target in _ADDITIONS:
            if user.args[0] is node or len(user.args) != 2 or user.kwargs:
                return False
            continue
        if user.op != "call_module":
            return False
        module = modules[user.target]
        if type(module) is nn.Identity:
            if not _read_only_by_layers(user, modules, additions):
                return False
        elif not isinstance(module, _READ_ONLY_LAYERS):
            return False
    return bool(node.users)


def _kept_by_a_reader(node: fx.Node, modules: dict) -> bool:
    """Whether a layer reading ``node``'s output (directly or through identity modules) keeps it
    for its own backward: only then does keeping the batch norm's output instead of its input save
    a tensor (average pooling keeps none)."""
    for user in node.users:
        module = modules.get(user.target) if user.op == "call_module" else None
        if type(module) is nn.Identity and _kept_by_a_reader(user, modules):
            return True
        if isinstance(module, _KEEP_THEIR_INPUT + _MAX_POOLS + _CONV_TRANSPOSES):
            return True
    return False


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_READ_ONLY_LAYERS = (
    *_KEEP_THEIR_INPUT,
    *_CONV_TRANSPOSES,
    *_MAX_POOLS,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node using ``node``'s output, when it is a module called on that alone."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    return users[0] if users[0].args == (node,) and not users[0].kwargs else None


# --------------------------------------------------------------------------------------------
# residual units: act(bn(x) + shortcut) in a block's own forward
# --------------------------------------------------------------------------------------------

_ADDITIONS = (operator.add, operator.iadd, torch.add)  # fx records ``x += y`` as operator.add


def residual_unit(
    bn: nn.Module, input: torch.Tensor, residual: torch.Tensor, act: nn.Module, inplace: bool
) -> torch.Tensor:
    """``act(bn(input) + residual)``, what a rewritten block's forward calls in place of its three
    steps: bnlab's :meth:`bnlab.nn.BatchNorm.add_act` when ``bn`` is a bnlab batch norm and ``act``
    a ReLU / LeakyReLU (slope > 0), neither with hooks, and the residual has the input's shape,
    dtype and device; otherwise the three steps, so a layer replaced or hooked after fusing still
    runs as the user expects (the in-place mode, which computes another function, raises then).
    fx records ``x += r`` and ``x = x + r`` alike: where they differ (r of another dtype or a
    broadcast shape) this adds in place when that is possible, as ResNet blocks do."""
    rule = _ACTIVATIONS.get(type(act))
    fits = (residual.shape, residual.dtype, residual.device) == (
        input.shape,
        input.dtype,
        input.device,
    )
    hooked = has_hooks(bn) or has_hooks(act)
    if rule is not None and isinstance(bn, BatchNorm) and fits and not hooked:
        activation, param = _invertible(*rule(act)) if inplace else rule(act)
        if activation != "leaky_relu" or param > 0:
            return bn.add_act(input, residual, activation, param, inplace)
    if inplace:
        raise RuntimeError(
            "an in-place residual unit needs a bnlab batch norm, a ReLU / LeakyReLU (slope > 0), "
            "neither with hooks, and a shortcut of the input's shape, dtype and device; got "
            f"{type(bn).__name__}, {type(act).__name__}{' with hooks' if hooked else ''}, a "
            f"{residual.dtype} shortcut {tuple(residual.shape)} for a {input.dtype} input "
            f"{tuple(input.shape)}: bnlab.revert the model before changing them"
        )
    out = bn(input)
    if _adds_in_place(out, residual):
        out += residual
    else:
        out = out + residual
    return act(out)


def _adds_in_place(out: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``out += residual`` is legal: no broadcast of ``out``, no promotion it can't hold."""
    shape_kept = torch.broadcast_shapes(out.shape, residual.shape) == out.shape
    return shape_kept and torch.can_cast(torch.result_type(out, residual), out.dtype)


def concat_unit(bn: nn.Module, chunks) -> torch.Tensor:
    """``bn(torch.cat(chunks, 1))``, what a rewritten block's forward calls in place of those two
    steps: :meth:`bnlab.nn.BatchNorm.concat` (the chunks read from a buffer the block's layers
    share) when ``bn`` is a bnlab batch norm without hooks; otherwise the two steps, so a layer
    replaced or hooked after fusing still runs as the user expects."""
    if isinstance(bn, BatchNorm) and not has_hooks(bn):
        return bn.concat(chunks)
    return bn(torch.cat(chunks, 1))


def _fx_tracing() -> bool:
    """torch.fx's ``is_fx_tracing()`` (symbolic tracing or torch.export), read from the flag it
    returns: the function itself logs a warning once per process, which every user of a fused
    model saw at its first forward."""
    tracing = torch.fx._symbolic_trace  # (torch's; the flag is what is_fx_tracing returns)
    flag = getattr(tracing, "_is_fx_tracing_flag", None)
    return tracing.is_fx_tracing() if flag is None else flag


class ResidualForward:
    """The forward bnlab gave a block whose own forward ends a residual unit as
    ``x = bn(x); x += shortcut; x = act(x)`` (timm's and torchvision's ResNet blocks, and any
    block written so), or normalizes a concatenation, ``bn(torch.cat(features, 1))`` (timm's and
    torchvision's DenseNet layers): the block's torch.fx graph with those steps as one
    :func:`residual_unit` or :func:`concat_unit` call. Set on the instance (the class is
    untouched, so ``isinstance``, ``state_dict`` and pickling by class name still work);
    :func:`bnlab.revert` deletes it.

    ``units``: (batch norm, activation) names relative to the block; ``concats``: the batch
    norms whose concatenated input is read from the shared buffer. Copies share the compiled
    code; an unpickled one traces the block again at its first call. Traced by torch.fx, the block
    runs its own forward, which computes the same (the in-place mode raises). A block traced with
    a list of features runs its own forward when called with one tensor (DenseNet's layers take
    either).
    """

    def __init__(
        self, block: nn.Module, units: list, inplace: bool, code=None, concats: tuple = ()
    ) -> None:
        self.block, self.units, self.inplace, self.code = block, units, inplace, code
        self.concats = tuple(concats)

    def __call__(self, *args, **kwargs):
        if _fx_tracing():  # another tracer (timm's feature extraction...): the block's own code
            if self.inplace:
                raise RuntimeError(
                    f"{type(self.block).__name__}'s residual units run in place, a function its "
                    "own forward (which torch.fx would trace) does not compute: bnlab.revert the "
                    "model, or convert it without inplace_abn, to trace it"
                )
            return type(self.block).forward(self.block, *args, **kwargs)
        if self.code is None:
            self.code = _rewritten_code(self.block, self.units, self.inplace, self.concats)
        listed = self.code.concatenated  # (position, name) of arguments traced as lists
        if any(isinstance(kwargs[n] if n in kwargs else args[i], torch.Tensor) for i, n in listed):
            return type(self.block).forward(self.block, *args, **kwargs)
        return self.code(self.block, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> ResidualForward:
        block = copy.deepcopy(self.block, memo)
        return ResidualForward(block, list(self.units), self.inplace, self.code, self.concats)

    def __reduce__(self):
        return ResidualForward, (self.block, self.units, self.inplace, None, self.concats)

    def __repr__(self) -> str:
        steps = [f"{bn} + add -> {act}" for bn, act in self.units]
        steps += [f"cat -> {bn}" for bn in self.concats]
        return f"ResidualForward({', '.join(steps)}{', in place' if self.inplace else ''})"


def _rewrite_blocks(
    model: nn.Module, graph: fx.Graph, modules: dict, calls: Counter, inplace: bool
) -> tuple[list[str], list[str]]:
    """Rewrite, in place, the forward of every block of ``model`` that ends a residual unit or
    normalizes a concatenation (see :class:`ResidualForward`) where that changes nothing else: the
    batch norm's output goes to the addition alone and the sum to the activation alone (a
    concatenation goes to the batch norm alone), the modules unhooked, and the block's own graph
    (traced alone) the same in training and eval mode, its forward taking only positional
    arguments without defaults (traced alone, a default such as ``shortcut=None`` would be a
    placeholder and its ``if shortcut is None`` branch lost). In the in-place mode, residual units
    only, where the batch norm's input is a conv / linear output nothing else reads and the output
    and the shortcut are only read afterwards (the backward keeps both). Returns the
    "bn + add -> act" and the "cat -> bn" names."""
    units = _residual_units(graph, modules, inplace)
    concats = {} if inplace else _concat_units(graph, modules, calls)
    residual_names, concat_names = [], []
    for block_name in dict.fromkeys([*units, *concats]):
        block = modules[block_name] if block_name else model
        if isinstance(vars(block).get("forward"), ResidualForward) or has_hooks(block):
            continue
        block_units, block_concats = units.get(block_name, []), concats.get(block_name, [])
        try:
            code = _rewritten_code(block, block_units, inplace, block_concats)
        except _CannotRewrite:
            continue
        block.forward = ResidualForward(block, block_units, inplace, code, block_concats)
        prefix = f"{block_name}." if block_name else ""
        residual_names += [f"{prefix}{bn} + add -> {prefix}{act}" for bn, act in block_units]
        concat_names += [f"cat -> {prefix}{bn}" for bn in block_concats]
    return residual_names, concat_names


def _residual_units(graph: fx.Graph, modules: dict, inplace: bool) -> dict[str, list]:
    """Block name -> its residual units, (batch norm, activation) names relative to the block."""
    by_block: dict[str, list] = {}
    claimed = set()  # additions fused; of two batch norms added (downsampling shortcut), the first
    for node in graph.nodes:
        unit = _residual_unit_at(node, modules)
        if unit is None or unit[0] in claimed:
            continue
        add, act_node, block = unit
        if inplace and not _inplace_unit_safe(node, add, act_node, modules):
            continue
        claimed.add(add)
        prefix = f"{block}." if block else ""
        if not (node.target.startswith(prefix) and act_node.target.startswith(prefix)):
            continue
        relative = (node.target[len(prefix) :], act_node.target[len(prefix) :])
        by_block.setdefault(block, []).append(relative)
    return by_block


def _concat_units(graph: fx.Graph, modules: dict, calls: Counter) -> dict[str, list]:
    """Block name -> the batch norms (names relative to the block) that alone read a
    ``torch.cat(..., 1)`` written in that block's forward: bnlab batch norms, not in place,
    unhooked, called once (``calls``: module id -> its calls in the graph)."""
    by_block: dict[str, list] = {}
    for node in graph.nodes:
        if not _concatenation(node) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        bn = modules[user.target]
        if not isinstance(bn, BatchNorm) or getattr(bn, "inplace", False) or has_hooks(bn):
            continue
        if calls[id(bn)] != 1:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        block = list(stack)[-1] if stack else ""
        block = block.partition("@")[0]
        prefix = f"{block}." if block else ""
        if user.target.startswith(prefix):
            by_block.setdefault(block, []).append(user.target[len(prefix) :])
    return by_block


def _concatenation(node: fx.Node) -> bool:
    """A ``torch.cat(tensors, 1)`` call (dim given by position or keyword)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1 and len(node.args) + len(node.kwargs) == 2


def _residual_unit_at(node: fx.Node, modules: dict) -> Optional[tuple]:
    """(add node, activation node, block name) when ``node`` is a bnlab batch norm (unhooked) whose
    output only an addition reads, whose sum only a ReLU / LeakyReLU module (unhooked) reads."""
    if node.op != "call_module" or type(modules[node.target]) not in _FUSED_CLASS:
        return None
    if has_hooks(modules[node.target]) or len(node.users) != 1:
        return None
    (add,) = node.users
    if add.op != "call_function" or add.target not in _ADDITIONS or add.kwargs:
        return None
    if len(add.args) != 2 or list(add.args).count(node) != 1:
        return None
    if not isinstance(_shortcut(add, node), fx.Node) or len(add.users) != 1:
        return None
    (act_node,) = add.users
    if act_node.op != "call_module" or act_node.args != (add,) or act_node.kwargs:
        return None
    act = modules[act_node.target]
    if type(act) not in _ACTIVATIONS or has_hooks(act):
        return None
    if type(act) is nn.LeakyReLU and not act.negative_slope > 0:
        return None
    stack = add.meta.get("nn_module_stack") or {}
    return add, act_node, (list(stack)[-1] if stack else "")


def _shortcut(add: fx.Node, bn_node: fx.Node):
    """The addition's operand that is not the batch norm's output."""
    return add.args[1] if add.args[0] is bn_node else add.args[0]


def _inplace_unit_safe(node: fx.Node, add: fx.Node, act_node: fx.Node, modules: dict) -> bool:
    """Whether the in-place residual unit may overwrite the batch norm's input and keep its output
    and the shortcut for the backward."""
    return (
        _overwritable_input(node, modules)
        and _read_only_by_layers(act_node, modules, additions=True)
        and _read_only_by_layers(_shortcut(add, node), modules, additions=True, besides=add)
    )


_PLAIN = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _CannotRewrite(Exception):
    """The block's graph cannot stand for its forward (see :func:`_rewritten_code`)."""


def _rewritten_code(block: nn.Module, units: list, inplace: bool, concats=()) -> Callable:
    """``forward(self, *args)`` of ``block`` with each (batch norm, activation) unit's three steps
    as one :func:`residual_unit` call and each batch norm of ``concats`` with the concatenation
    it reads as one :func:`concat_unit` call: the block traced alone, in training and in eval
    mode (a graph that differs between them stands for a forward that branches on the mode)."""
    parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]
    if any(p.default is not p.empty or p.kind not in _PLAIN for p in parameters):
        raise _CannotRewrite("the block's forward takes defaults, *args or **kwargs")
    graphs = [_block_graph(block, mode) for mode in (True, False)]
    sources = [g.python_code("self").src for g in graphs]
    if sources[0] != sources[1]:
        raise _CannotRewrite("the block's forward depends on the mode")
    _check_traced_into(block, graphs[0])
    graph = graphs[0]
    for bn_name, act_name in units:
        _replace_unit(graph, bn_name, act_name, inplace)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    concatenated = set()
    for bn_name in concats:
        chunks = _replace_concat(graph, bn_name)
        if chunks in placeholders:  # an argument: a list of tensors when traced
            position = placeholders.index(chunks)
            concatenated.add((position, parameters[position].name))
    code = graph.python_code("self")
    namespace = dict(code.globals)
    filename = f"<bnlab rewritten forward of {type(block).__name__}>"
    exec(compile(code.src, filename, "exec"), namespace)
    forward = namespace["forward"]
    forward.concatenated = tuple(sorted(concatenated))
    return forward


def _check_traced_into(block: nn.Module, graph: fx.Graph) -> None:
    """Raise unless every submodule the trace went into is a plain container: the graph fixes
    what a traced-into module's forward read (timm's DropPath with rate 0 traces to nothing, and a
    rate set later would be ignored), while layers (call_module nodes) and containers run as
    they are at each call."""
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    for node in graph.nodes:
        for key in node.meta.get("nn_module_stack") or {}:
            path = key.partition("@")[0]  # fx names a module's second call "relu@1"
            if path and path not in called:
                module = block.get_submodule(path)
                if type(module) not in _CONTAINERS:
                    raise _CannotRewrite(f"the trace goes into {path} ({type(module).__name__})")


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block_graph(block: nn.Module, training: bool) -> fx.Graph:
    modes = {m: m.training for m in block.modules()}
    try:
        block.train(training)
        return LayerTracer().trace(block)
    except Exception as error:  # data-dependent control flow and more
        raise _CannotRewrite(str(error)) from error
    finally:
        for module, mode in modes.items():
            module.training = mode


def _replace_unit(graph: fx.Graph, bn_name: str, act_name: str, inplace: bool) -> None:
    bn_node = next((n for n in graph.nodes if n.op == "call_module" and n.target == bn_name), None)
    if bn_node is None or len(bn_node.users) != 1:
        raise _CannotRewrite(f"{bn_name} is not called once, alone, in the block's own graph")
    (add,) = bn_node.users
    act_node = next(iter(add.users), None)
    if act_node is None or act_node.target != act_name or len(add.users) != 1:
        raise _CannotRewrite(f"{bn_name}'s sum does not go to {act_name} alone")
    shortcut = _shortcut(add, bn_node)
    with graph.inserting_before(add):
        bn = graph.get_attr(bn_name)
        act = graph.get_attr(act_name)
        fused = graph.call_function(residual_unit, (bn, bn_node.args[0], shortcut, act, inplace))
    act_node.replace_all_uses_with(fused)
    for node in (act_node, add, bn_node):
        graph.erase_node(node)


def _replace_concat(graph: fx.Graph, bn_name: str):
    """Replace ``bn(torch.cat(chunks, 1))``; returns what the chunks are (a node or a list)."""
    bn_node = next((n for n in graph.nodes if n.op == "call_module" and n.target == bn_name), None)
    cat = bn_node.args[0] if bn_node is not None and len(bn_node.args) == 1 else None
    if not isinstance(cat, fx.Node) or not _concatenation(cat) or len(cat.users) != 1:
        raise _CannotRewrite(f"{bn_name} does not read a concatenation alone in the block's graph")
    chunks = cat.args[0]
    with graph.inserting_before(bn_node):
        bn = graph.get_attr(bn_name)
        fused = graph.call_function(concat_unit, (bn, chunks))
    bn_node.replace_all_uses_with(fused)
    graph.erase_node(bn_node)
    graph.erase_node(cat)  # (which clears its arguments)
    return chunks
