"""Backend registry: which module's kernels run an op, decided once per call.

A backend is a module with the plain functions (no autograd inside) of the ops it supports, as
written once in :mod:`bnlab.kernels.contract`. It is registered with a ``supports(op, tensor)``
predicate, a priority and, optionally, ``prefers(op, tensor, activation=None)`` (the activation of a
``batch_norm_act``, else None): automatic selection takes the
highest-priority backend that supports *and* prefers the input (a backend can run something it is
not the fastest at, and still be asked for it by name). The ops (:data:`OPS`):

- ``batch_norm``: a training forward; ``batch_norm_backward``: the backward of a plain training
  batch norm (its fastest backend may not be the forward's); ``batch_norm_eval``: eval mode (one
  streaming pass); ``batch_norm_masked``: training statistics over the valid positions of a mask;
- ``batch_norm_act``: batch norm with a fused activation, and the in-place activated mode;
  ``batch_norm_act_eval``: the same in eval mode (told apart as ``batch_norm_eval`` is);
- ``layer_norm``.

Registered here, each under its module's name: ``composite`` (:mod:`bnlab.kernels.composite`,
PyTorch ops, any device and dtype), ``native`` (:mod:`bnlab.kernels.native`, PyTorch's own ATen
batch-norm kernels: float32/float64, and half types through ATen's mixed-precision kernel), where
Numba is installed ``cpu`` (:mod:`bnlab.kernels.cpu`: CPU float32/float64, contiguous or
channels_last, fused activations), which leaves to ``native`` what ATen runs as fast (see
:func:`bnlab.kernels.cpu.prefers`), and, where Triton is installed and a GPU is present, ``gpu``
(:mod:`bnlab.kernels.gpu`: CUDA float16/bfloat16/float32/float64, fused activations; CPU tensors
too under ``TRITON_INTERPRET=1``), which runs only when asked for by name until its GPU sweep is
measured (automatic selection sends CUDA tensors to ``native``: cuDNN / ATen). The names
``torch``, ``numba`` and ``triton`` are accepted for ``composite``, ``cpu`` and ``gpu``.

Selection, strongest first:

1. the ``backend=`` argument of a functional op or module;
2. the ``BNLAB_BACKEND`` environment variable (``auto`` or empty means automatic);
3. automatic: the registered backend of highest priority that supports and prefers the input,
   decided once per call signature (op, activation, dtype, device, shape and strides: what
   ``supports`` and ``prefers`` may look at) and remembered.

A backend requested by name (1 or 2) that cannot run the input raises; automatic selection always
ends at the ``composite`` backend, which runs any device and dtype.

A process forked after its parent's Numba kernels started their GNU OpenMP threads (a fork-started
DataLoader worker or multiprocessing pool) cannot run them: ``cpu`` is withdrawn there
(:func:`withdraw_backend`), its calls go to ``native``, and naming it raises, saying why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import torch

from . import composite, native

__all__ = [
    "Backend",
    "OPS",
    "register_backend",
    "unregister_backend",
    "withdraw_backend",
    "withdrawn_backends",
    "available_backends",
    "get_backend",
    "select_backend",
    "select_residual_backend",
    "requested_backend",
    "adds_residual",
    "selection_state",
]

OPS = (
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_masked",
    "batch_norm_eval",
    "batch_norm_act",
    "batch_norm_act_eval",
    "layer_norm",
)

ALIASES = {"torch": "composite", "numba": "cpu", "triton": "gpu"}  # their former names


@dataclass(frozen=True)
class Backend:
    """A registered backend: its name, the module with its kernels, and when it runs."""

    name: str
    module: ModuleType
    supports: Callable[[str, torch.Tensor], bool]
    priority: int
    prefers: Optional[Callable[..., bool]] = None  # (op, x, activation=None) -> bool

    def takes(self, op: str, x: torch.Tensor, activation: Optional[str] = None) -> bool:
        """Whether automatic selection gives ``op`` on ``x`` (with ``activation``, for
        batch_norm_act) here, if no backend above takes it."""
        if not self.supports(op, x):
            return False
        return self.prefers is None or self.prefers(op, x, activation=activation)


_BACKENDS: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # _BACKENDS' values, highest priority first (kept on register)
_WITHDRAWN: dict[str, str] = {}  # backends this process cannot run -> why (withdraw_backend)


def register_backend(
    name: str,
    module: ModuleType,
    supports: Callable[[str, torch.Tensor], bool],
    priority: int = 0,
    prefers: Optional[Callable[..., bool]] = None,
) -> None:
    """Add (or replace) a backend. ``supports(op, x)`` says whether it can run ``op`` on ``x``;
    ``prefers(op, x, activation=None)`` (default: always) whether automatic selection should take
    it."""
    _BACKENDS[name] = Backend(name, module, supports, priority, prefers)
    _WITHDRAWN.pop(name, None)
    _order_by_priority()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (e.g. one a test or a plugin added)."""
    del _BACKENDS[name]
    _order_by_priority()


def withdraw_backend(name: str, reason: str) -> None:
    """Remove ``name`` for the rest of this process because it cannot run here: automatic
    selection passes to the next backend (every decision is made again), and asking for it by
    name raises with ``reason`` (see :func:`get_backend`)."""
    if name in _BACKENDS:
        unregister_backend(name)
    _WITHDRAWN[name] = reason


def withdrawn_backends() -> dict[str, str]:
    """The backends withdrawn from this process, each with the reason (see
    :func:`withdraw_backend`)."""
    return dict(_WITHDRAWN)


def _order_by_priority() -> None:
    global _REGISTRY_TOKEN
    _BY_PRIORITY[:] = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
    _CHOSEN.clear()
    _REGISTRY_TOKEN = object()


def selection_state() -> tuple:
    """What automatic selection depends on besides the call: the registry (a token replaced at
    each change, so a copy or a new process never matches an old one) and $BNLAB_BACKEND. A
    decision cached with it (see :meth:`bnlab.nn.BatchNorm._eager`) holds while it is
    equal."""
    return (_REGISTRY_TOKEN, _requested_by_environment())


# automatic choices by call signature: (op, activation, dtype, device, shape, strides); a backend's
# supports / prefers must depend on nothing else. Cleared when the registry changes.
_CHOSEN: dict[tuple, Backend] = {}
_CHOSEN_MAX = 4096  # distinct signatures kept (a model has a few dozen)
_REGISTRY_TOKEN = object()


def available_backends() -> list[str]:
    """Registered backend names, highest priority first."""
    return [b.name for b in _BY_PRIORITY]


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (or its former name, see :data:`ALIASES`); a
    withdrawn one raises a RuntimeError with the reason (see :func:`withdraw_backend`)."""
    registered = ALIASES.get(name, name)
    backend = _BACKENDS.get(registered)
    if backend is None and registered in _WITHDRAWN:
        raise RuntimeError(f"bnlab backend {registered!r} cannot run: {_WITHDRAWN[registered]}")
    if backend is None:
        raise ValueError(
            f"unknown bnlab backend {name!r}; expected one of {available_backends()} or 'auto'"
        )
    return backend


_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def requested_backend(requested: Optional[str] = None) -> str:
    """The backend asked for by name: ``requested``, else $BNLAB_BACKEND, as its registered name
    (``numba`` -> ``cpu``...); "auto" when neither names one."""
    name = requested or _requested_by_environment() or "auto"
    return ALIASES.get(name, name)


def _requested_by_environment() -> str:
    """$BNLAB_BACKEND, read at each call (from os.environ's byte store where there is one:
    os.environ.get encodes the key, a third of a small batch norm's selection time)."""
    if _ENVIRON is None:
        return os.environ.get("BNLAB_BACKEND", "")
    value = _ENVIRON.get(b"BNLAB_BACKEND")
    return "" if value is None else os.fsdecode(value)


def select_backend(
    op: str, x: torch.Tensor, requested: Optional[str] = None, activation: Optional[str] = None
) -> Backend:
    """The backend that runs ``op`` on ``x``: ``requested`` > ``$BNLAB_BACKEND`` > automatic
    (which also weighs the ``activation`` of a batch_norm_act)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    name = requested or _requested_by_environment()
    if name and name != "auto":
        backend = get_backend(name)
        if not backend.supports(op, x):
            raise RuntimeError(
                f"bnlab backend {name!r} cannot run {op} on a {x.dtype} tensor on {x.device}; "
                "choose another backend or 'auto'"
            )
        return backend
    key = (op, activation, x.dtype, x.device, x.shape, x.stride())
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    for backend in _BY_PRIORITY:
        if backend.takes(op, x, activation):
            if len(_CHOSEN) >= _CHOSEN_MAX:
                _CHOSEN.clear()
            _CHOSEN[key] = backend
            return backend
    raise RuntimeError(f"no bnlab backend can run {op} on a {x.dtype} tensor on {x.device}")


def adds_residual(backend: Backend) -> bool:
    """Whether ``backend``'s fused kernels add a residual in their normalizing pass (see
    :func:`bnlab.kernels.composite.activated`); a backend a user registers may not say."""
    forward = getattr(backend.module, "batch_norm_act_forward", None)
    return bool(getattr(forward, "adds_residual", False))


def select_residual_backend(
    x: torch.Tensor, training: bool, requested: Optional[str], activation: str, inplace: bool
) -> Backend:
    """:func:`select_backend` of batch_norm_act (``training``) or batch_norm_act_eval on ``x``, for
    a batch norm with a residual added before its activation. The
    in-place mode always runs fused, so automatic selection there takes the highest-priority
    backend whose kernels add the residual in their normalizing pass and that support ``x``
    (bnlab's CPU kernels for CPU float32/float64), whatever it prefers: the generic way (batch
    norm, then the addition and the activation as PyTorch ops, then a backward from the output
    in PyTorch ops) costs several more passes."""
    op = "batch_norm_act" if training else "batch_norm_act_eval"
    chosen = select_backend(op, x, requested, activation)
    explicit = requested or _requested_by_environment()
    if not inplace or (explicit and explicit != "auto"):
        return chosen
    if adds_residual(chosen):
        return chosen
    for backend in _BY_PRIORITY:
        if adds_residual(backend) and backend.supports(op, x):
            return backend
    return chosen


register_backend("composite", composite, supports=lambda op, x: True, priority=0)
register_backend("native", native, supports=native.supports, priority=5)

try:
    from . import cpu
except ImportError:  # Numba missing or broken on this platform: the composite backend remains
    cpu = None
else:
    register_backend("cpu", cpu, supports=cpu.supports, priority=10, prefers=cpu.prefers)


def _after_fork_in_child() -> None:
    """A child forked after the parent's Numba kernels started GNU OpenMP threads cannot run them
    (see :func:`bnlab.kernels.cpu.openmp_pool_started`): the ``cpu`` backend is withdrawn there, so
    its layers run ATen's kernels (as torch.nn's would) instead of the child being terminated at
    its first batch norm. A DataLoader worker, a fork-started multiprocessing pool or server."""
    if "cpu" in _BACKENDS and cpu.openmp_pool_started():
        withdraw_backend("cpu", cpu.FORKED_AFTER_OPENMP)


if cpu is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _gpu_wanted() -> bool:
    """A GPU to run on, or Triton's CPU interpreter asked for (``TRITON_INTERPRET=1``, how the tests
    run the kernels without a GPU). Otherwise Triton is not even imported."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _gpu_wanted():
    try:
        from . import gpu
    except ImportError:  # Triton not installed (pip install 'bnlab[triton]')
        gpu = None
    else:
        register_backend("gpu", gpu, supports=gpu.supports, priority=20, prefers=gpu.prefers)
