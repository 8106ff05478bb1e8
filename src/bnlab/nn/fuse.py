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
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from torch import fx, nn

from ..functional import check_activation
from .act import BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import rebuild, replace_modules
from .dropact import has_hooks

__all__ = ["FusedActivation"]  # fusing itself: bnlab.convert(model, fuse_activations=True)

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
    bnlab's own containers included, is traced into."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return type(m).__module__.startswith("bnlab.nn.") or super().is_leaf_module(
            m, qualified_name
        )


def fuse_activations(model: nn.Module, inplace: bool = False) -> tuple[list[str], Optional[str]]:
    """Fuse, in place, every bnlab batch norm of ``model`` with the activation module after it
    where that changes nothing else (see the module's text). Returns what was fused ("bn -> act"
    names, or the batch norm's alone) and, if the model could not be traced, why (nothing is fused
    then).

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
        return [], f"torch.fx cannot trace the model ({type(error).__name__}: {error})"
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
        if inplace and activation == ("relu", None):
            activation = ("leaky_relu", _INPLACE_RELU_SLOPE)
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
    return fused, None


_INPLACE_RELU_SLOPE = 0.01  # Rota Bulo et al. 2018, section 3: leaky ReLU in place of ReLU


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


def _read_only_by_layers(node: fx.Node, modules: dict) -> bool:
    """Whether only layers that never write over their input read ``node``'s output (directly or
    through identity modules): the in-place mode keeps that output for its backward. fx records
    ``x += y`` as an addition, so anything but these layers counts as a possible writer."""
    for user in node.users:
        if user.op != "call_module":
            return False
        module = modules[user.target]
        if type(module) is nn.Identity:
            if not _read_only_by_layers(user, modules):
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
