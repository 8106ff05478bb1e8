"""bnlab's layers stay whole in any torch.fx trace, as torch.nn's do.

torch.fx's tracer keeps a layer whole (one ``call_module`` node) only when its class comes from
``torch.nn``; a bnlab layer would be traced into, and its forward branches on its input (rank,
layout, mode) where fx cannot follow a symbolic value: ``torch.fx.symbolic_trace`` of a converted
model failed, and with it what traces models that way (feature extraction, FX quantization). A
bnlab layer's forward, called by a tracer with a symbolic input, records the ``call_module`` node
a torch.nn layer would have given instead; run, the traced graph calls the layer itself.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import fx

__all__ = ["WholeWhenTraced", "whole_when_traced"]


def whole_when_traced(forward: Callable) -> Callable:
    """``forward`` that, called on an ``fx.Proxy`` (a tracer's symbolic input), records one
    ``call_module`` node for the layer instead of being traced into."""
    if getattr(forward, "_bnlab_whole_when_traced", False):
        return forward

    @functools.wraps(forward)
    def forward_or_node(self, *args, **kwargs):
        if args and isinstance(args[0], fx.Proxy):
            tracer = args[0].tracer
            try:
                path = tracer.path_of_module(self)
            except NameError:  # a layer outside the traced module: traced into, as before
                return forward(self, *args, **kwargs)
            return tracer.create_proxy("call_module", path, args, kwargs)
        return forward(self, *args, **kwargs)

    forward_or_node._bnlab_whole_when_traced = True
    return forward_or_node


class WholeWhenTraced:
    """Mixin: the ``forward`` of every subclass is wrapped by :func:`whole_when_traced`."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None:
            cls.forward = whole_when_traced(forward)
