"""Batch norm followed by a drop layer and an activation that are modules of their own: the layout
of timm's ``BatchNormAct2d`` (``timm.layers.norm_act``), which :func:`bnlab.nn.convert` turns into
:class:`BatchNormDropAct2d` and :func:`bnlab.nn.revert` gives back.

Where the drop layer does nothing and bnlab's fused op has the activation, the three run as one
:func:`bnlab.functional.batch_norm_act`; otherwise bnlab's batch norm runs, then the module's own
``drop`` and ``act`` objects, so any activation works and nothing about them changes.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .. import checks
from .. import functional as F
from .batchnorm import BatchNorm2d

__all__ = ["BatchNormDropAct2d", "fused_activation"]

Fused = tuple[str, Optional[float]]


def _fixed(name: str) -> Callable[[nn.Module], Fused]:
    return lambda module: (name, None)


def _gelu(module: nn.Module) -> Fused:
    return ("gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu", None)


# Exact classes only: a subclass may compute something else (timm's PReLU overrides forward).
# timm's classes are named, not imported: bnlab does not depend on timm.
_BY_CLASS: dict[type, Callable[[nn.Module], Fused]] = {
    nn.Identity: _fixed("identity"),
    nn.ReLU: _fixed("relu"),
    nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    nn.ELU: lambda m: ("elu", m.alpha),
    nn.SiLU: _fixed("silu"),
    nn.Hardswish: _fixed("hardswish"),
    nn.GELU: _gelu,
    nn.Hardsigmoid: _fixed("hardsigmoid"),
}
_BY_NAME: dict[str, Callable[[nn.Module], Fused]] = {
    "timm.layers.activations.Swish": _fixed("silu"),  # x * sigmoid(x)
    "timm.layers.activations_me.SwishMe": _fixed("silu"),
    "timm.layers.activations.HardSwish": _fixed("hardswish"),  # x * relu6(x + 3) / 6
    "timm.layers.activations_me.HardSwishMe": _fixed("hardswish"),
    "timm.layers.activations.HardSigmoid": _fixed("hardsigmoid"),  # relu6(x + 3) / 6
    "timm.layers.activations_me.HardSigmoidMe": _fixed("hardsigmoid"),
    "timm.layers.activations.GELU": _fixed("gelu"),  # F.gelu(x), exact
    "timm.layers.activations.GELUTanh": _fixed("gelu_tanh"),
}
# Layers that pass their input through unchanged in eval mode (and always when p == 0)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def qualified_name(cls: type) -> str:
    """'package.module.Class', the name classes bnlab does not import are known by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def has_hooks(module: nn.Module) -> bool:
    """Whether running around ``module`` would skip hooks registered on it."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def fused_activation(act: nn.Module) -> Optional[Fused]:
    """(name, parameter) of bnlab's fused activation that computes exactly what ``act`` does, or
    None. Only names in :data:`bnlab.checks.ACTIVATIONS` (read at each call) are answered."""
    rule = _BY_CLASS.get(type(act)) or _BY_NAME.get(qualified_name(type(act)))
    if rule is None:
        return None
    name, param = rule(act)
    return (name, param) if name in checks.ACTIVATIONS else None


def _passes_through(drop: nn.Module) -> bool:
    if type(drop) is nn.Identity:
        return True
    return type(drop) in _DROPOUTS and (not drop.training or drop.p == 0)


class BatchNormDropAct2d(BatchNorm2d):
    r"""``act(drop(BatchNorm2d(x)))`` with ``drop`` and ``act`` modules of their own (timm's
    ``BatchNormAct2d`` layout: its checkpoints load, its ``drop``/``act`` objects are kept).

    .. math::
        y = \mathrm{act}\Big(\mathrm{drop}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x]
            + \epsilon}} \gamma + \beta\Big)\Big)

    Batch norm (Ioffe & Szegedy 2015) as :class:`bnlab.nn.BatchNorm2d`, torch.nn's semantics
    (momentum None: cumulative average; ``track_running_stats``; ``affine``). When ``drop`` passes
    its input through (``nn.Identity``, or a dropout in eval mode or with p = 0), ``act`` has a
    counterpart in bnlab's fused op (see :meth:`fused`) and neither carries hooks, the whole runs as
    one :func:`bnlab.functional.batch_norm_act`; otherwise as batch norm, then ``self.drop``, then
    ``self.act``. Parameters, buffers and ``state_dict`` keys are those of BatchNorm2d, plus
    whatever ``drop`` and ``act`` hold (e.g. a PReLU's weight under ``act.weight``).

    Args: those of :class:`bnlab.nn.BatchNorm2d`, in its order, plus the keyword-only

        act: the activation module (default ``nn.ReLU()``, as timm's).
        drop: the drop layer (default ``nn.Identity()``).
    """

    def __init__(
        self,
        *args,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name, module in (("act", act), ("drop", drop)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.ReLU() if act is None else act

    def fused(self) -> Optional[Fused]:
        """(activation, parameter) the next forward fuses, or None when it runs batch norm, drop
        and act one after the other (a drop layer that acts, an activation bnlab's fused op does
        not have, or hooks on either)."""
        drop, act = self._modules["drop"], self._modules["act"]  # not nn.Module.__getattr__
        if not _passes_through(drop) or has_hooks(drop) or has_hooks(act):
            return None
        return fused_activation(act)

    def _concat_activation(self) -> Optional[Fused]:
        return self.fused() if type(self).forward is BatchNormDropAct2d.forward else None

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``act(drop(batch_norm(input)))``; an optional ``mask`` as :class:`BatchNorm`'s (it runs
        unfused: the fused op has no mask)."""
        fused = None if mask is not None else self.fused()
        if fused is None:
            return self.act(self.drop(super().forward(input, mask)))
        out = self._eager(input, *fused)
        if out is not None:
            return out
        self._check_input_dim(input)
        return F.batch_norm_act(
            input,
            **self._functional_args(),
            activation=fused[0],
            activation_param=fused[1],
            strict=self.strict,
            backend=self.backend,
        )
