"""Backend registry: every backend exposes the same plain functions (no autograd inside).

A backend is a module with the functions of the ops it supports (see :mod:`bnlab.kernels.torch_ops`
for their contract): ``batch_norm_forward``/``_backward`` (ops ``batch_norm`` and, with a mask,
``batch_norm_masked``, ``batch_norm_eval`` for eval mode, and ``batch_norm_backward`` for the
backward of a plain training batch norm, which may go to another backend than its forward), ``batch_norm_act_forward``/``_backward`` (op ``batch_norm_act``: fused
activation and the in-place mode) and ``layer_norm_forward``/``_backward`` (op ``layer_norm``). It is
registered with a ``supports(op, tensor)`` predicate and a priority.

A backend may also give ``prefers(op, tensor)``: automatic selection takes the highest-priority
backend that supports *and* prefers the input (a backend can run something it is not the fastest
at, and still be asked for it by name).

Registered here: ``torch`` (composite PyTorch ops, any device and dtype), ``native`` (PyTorch's own
ATen batch-norm kernels, plain batch norm in float32/float64) and, where Numba is installed,
``numba`` (:mod:`bnlab.kernels.cpu`: CPU float32/float64, contiguous or channels_last, fused
activations), which defers to ``native`` where ATen is as fast (channels innermost, many channels),
and, where Triton is installed and a GPU is present, ``triton`` (:mod:`bnlab.kernels.triton`: CUDA
float16/bfloat16/float32/float64, fused activations; CPU tensors too under ``TRITON_INTERPRET=1``,
but only when asked for by name).

Selection, strongest first:

1. the ``backend=`` argument of a functional op or module;
2. the ``BNLAB_BACKEND`` environment variable (``auto`` or empty means automatic);
3. automatic: the registered backend of highest priority whose ``supports`` accepts the input.

A backend requested by name (1 or 2) that cannot run the input raises; automatic selection always
ends at the composite ``torch`` backend, which runs any device and dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import native, torch_ops

__all__ = ["Backend", "register_backend", "unregister_backend", "available_backends",
           "select_backend"]

OPS = ("batch_norm", "batch_norm_backward", "batch_norm_masked", "batch_norm_eval", "batch_norm_act",
       "layer_norm")


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType
    supports: Callable[[str, torch.Tensor], bool]
    priority: int
    prefers: Callable[[str, torch.Tensor], bool] | None = None


_BACKENDS: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # _BACKENDS' values, highest priority first (kept on register)


def register_backend(
    name: str,
    module: ModuleType,
    supports: Callable[[str, torch.Tensor], bool],
    priority: int = 0,
    prefers: Callable[[str, torch.Tensor], bool] | None = None,
) -> None:
    """Add (or replace) a backend. ``supports(op, x)`` says whether it can run ``op`` on ``x``;
    ``prefers(op, x)`` (default: always) whether automatic selection should take it."""
    _BACKENDS[name] = Backend(name, module, supports, priority, prefers)
    _order_by_priority()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (e.g. one a test or a plugin added)."""
    del _BACKENDS[name]
    _order_by_priority()


def _order_by_priority() -> None:
    _BY_PRIORITY[:] = sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def available_backends() -> list[str]:
    """Registered backend names, highest priority first."""
    return [b.name for b in _BY_PRIORITY]


def select_backend(op: str, x: torch.Tensor, requested: str | None = None) -> ModuleType:
    """The module that runs ``op`` on ``x``: ``requested`` > ``$BNLAB_BACKEND`` > automatic."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    name = requested or os.environ.get("BNLAB_BACKEND", "")
    if name and name != "auto":
        backend = _BACKENDS.get(name)
        if backend is None:
            raise ValueError(
                f"unknown bnlab backend {name!r}; expected one of {available_backends()} or 'auto'"
            )
        if not backend.supports(op, x):
            raise RuntimeError(
                f"bnlab backend {name!r} cannot run {op} on a {x.dtype} tensor on {x.device}; "
                "choose another backend or 'auto'"
            )
        return backend.module
    for backend in _BY_PRIORITY:
        if backend.supports(op, x) and (backend.prefers is None or backend.prefers(op, x)):
            return backend.module
    raise RuntimeError(f"no bnlab backend can run {op} on a {x.dtype} tensor on {x.device}")


register_backend("torch", torch_ops, supports=lambda op, x: True, priority=0)
register_backend("native", native, supports=native.supports, priority=5)

try:
    from . import cpu
except ImportError:  # Numba missing or broken on this platform: the composite backend remains
    cpu = None
else:
    register_backend("numba", cpu, supports=cpu.supports, priority=10, prefers=cpu.prefers)


def _triton_wanted() -> bool:
    """A GPU to run on, or Triton's CPU interpreter asked for (``TRITON_INTERPRET=1``, how the tests
    run the kernels without a GPU). Otherwise Triton is not even imported."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _triton_wanted():
    try:
        from . import triton as triton_kernels
    except ImportError:  # Triton not installed (pip install 'bnlab[triton]')
        triton_kernels = None
    else:
        register_backend("triton", triton_kernels, supports=triton_kernels.supports, priority=20,
                         prefers=triton_kernels.prefers)
