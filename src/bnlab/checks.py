"""Argument checks of the public ops, and their error texts: each names what is wrong and what was
expected. Nothing here changes a tensor."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.composite import accumulation_dtype, values_per_channel
from .kernels.contract import ACTIVATIONS, INVERTIBLE_ACTIVATIONS  # the table of their definitions
from .statistics import RunningStatistics

__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "check_input",
    "check_vector",
    "check_mask",
    "valid_count",
    "check_batch_norm_args",
    "check_layer_norm_args",
    "check_activation",
    "RESIDUAL_ACTIVATIONS",
    "check_residual",
    "check_residual_activation",
    "check_untransformable",
]

_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0}  # the others take no parameter (0.0)


def check_input(op: str, input) -> None:
    """A floating-point tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op} expects a torch.Tensor input, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(
            f"{op} expects a floating-point input (float64, float32, float16 or bfloat16), "
            f"got {input.dtype}"
        )


def check_vector(name: str, t, shape: tuple, input: Tensor, what: str) -> None:
    """A parameter or statistic: None, or a tensor of ``shape`` on input's device, of input's dtype
    or its accumulation dtype."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    _check_shape_and_device(name, t, shape, input, lambda s: f" ({what}; input shape {s})")
    allowed = {input.dtype, accumulation_dtype(input.dtype)}
    if t.dtype not in allowed:
        raise TypeError(
            f"{name} has dtype {t.dtype}, expected {' or '.join(sorted(map(str, allowed)))} "
            f"for a {input.dtype} input"
        )


def check_mask(mask: Optional[Tensor], input: Tensor) -> None:
    """None, or a bool tensor shaped like input without dim 1 (N, *spatial), on input's device."""
    if mask is None:
        return
    expected = (input.shape[0], *input.shape[2:])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = valid position), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )

    def why(shape: tuple) -> str:
        return f": the input's shape {shape} without the channel dim 1"

    _check_shape_and_device("mask", mask, expected, input, why)


def _check_shape_and_device(name: str, t: Tensor, shape: tuple, input: Tensor, why) -> None:
    """t has ``shape``, else a ValueError ending in ``why(input's shape)``, and input's device."""
    if tuple(t.shape) != shape:
        detail = why(tuple(input.shape))  # formatted only for the error: checks run on every call
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}{detail}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device}, expected the input's device {input.device}")


def valid_count(mask: Tensor, training: bool) -> Tensor:
    """The mask's count of valid positions; in training (eager) at least 2 (a host read)."""
    count = mask.sum()
    if training and not torch.compiler.is_compiling() and int(count) < 2:
        raise ValueError(
            f"Expected more than 1 valid value per channel when training, the mask has {int(count)}"
        )
    return count


def vectors_fit(input: Tensor, *vectors: Optional[Tensor]) -> bool:
    """The common case of :func:`check_vector` for every (C,) vector (or None) at once, in a few
    microseconds less (it runs on every call of every layer)."""
    shape, device, dtype = input.shape[1:2], input.device, input.dtype
    for t in vectors:
        if t is None:
            continue
        if not (
            isinstance(t, Tensor)
            and t.shape == shape
            and (t.dtype is dtype or t.dtype is accumulation_dtype(dtype))
            and t.device == device
        ):
            return False
    return True


def check_batch_norm_args(
    input,
    weight,
    bias,
    running: RunningStatistics,
    training,
    eps,
    op="batch_norm",
    local_count=True,
) -> None:
    """The arguments of a batch norm. ``local_count``: training needs more than one value per
    channel in this call (False where the count is global, as in synchronized batch norm)."""
    running_mean, running_var = running.mean, running.var
    check_input(op, input)
    if input.dim() < 2:
        raise ValueError(
            f"{op} expects an input of rank >= 2 shaped (N, C, *) with channels on dim 1, "
            f"got shape {tuple(input.shape)}"
        )
    if not vectors_fit(input, weight, bias, running_mean, running_var):  # then say which, why
        what = f"one value per channel, C = {input.shape[1]}"
        names = ("weight", "bias", "running_mean", "running_var")
        for name, t in zip(names, (weight, bias, running_mean, running_var)):
            check_vector(name, t, (input.shape[1],), input, what)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError(f"{op} in eval mode (training=False) needs running_mean and running_var")
    if local_count and training and values_per_channel(input) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    _check_momentum(running, training and running_mean is not None)


def _check_momentum(running: RunningStatistics, updates: bool) -> None:
    momentum, num_batches_tracked = running.momentum, running.num_batches_tracked
    if momentum is None:
        if updates and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    elif not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if num_batches_tracked is not None and (
        num_batches_tracked.numel() != 1 or num_batches_tracked.dtype.is_floating_point
    ):
        raise ValueError(
            "num_batches_tracked must be a one-element integer tensor, got "
            f"shape {tuple(num_batches_tracked.shape)} dtype {num_batches_tracked.dtype}"
        )


def check_layer_norm_args(input, normalized_shape, weight, bias, eps) -> tuple[int, ...]:
    """The arguments of a layer norm; returns ``normalized_shape`` as a tuple of ints."""
    check_input("layer_norm", input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(s) for s in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k :]) != normalized_shape:
        raise ValueError(
            f"layer_norm normalizes over the trailing dims normalized_shape="
            f"{list(normalized_shape)}, but the input has shape {tuple(input.shape)}"
        )
    check_vector("weight", weight, normalized_shape, input, "normalized_shape")
    check_vector("bias", bias, normalized_shape, input, "normalized_shape")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return normalized_shape


def check_activation(activation: str, param: Optional[float], inplace: bool) -> tuple[str, float]:
    """Validate an activation name and its parameter; returns (name, parameter with its default).

    Only leaky_relu (negative slope) and elu (alpha) take a parameter; for the others it must be
    None or their 0.0 (what this returns for them), never a value that would be ignored."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    default = _DEFAULT_PARAM.get(activation, 0.0)
    param = default if param is None else float(param)
    if activation not in _DEFAULT_PARAM and param != 0.0:
        raise ValueError(
            f"{activation!r} takes no parameter, got activation_param={param}; only "
            f"{tuple(_DEFAULT_PARAM)} take one"
        )
    if inplace and activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"the in-place mode recovers its input by inverting the activation; {activation!r} is "
            f"not invertible, expected one of {INVERTIBLE_ACTIVATIONS} (the fused mode without "
            f"inplace, BatchNormAct, runs {activation!r})"
        )
    if inplace and activation in ("leaky_relu", "elu") and not param > 0:
        raise ValueError(
            f"the in-place mode needs an invertible {activation}: its parameter must be > 0, "
            f"got {param}"
        )
    if activation == "elu" and param < 0:
        raise ValueError(f"elu needs alpha >= 0, got {param}")
    return activation, param


RESIDUAL_ACTIVATIONS = ("identity", "relu", "leaky_relu")


def check_residual(
    residual, input: Tensor, activation: str, param: Optional[float], inplace: bool
) -> tuple[str, float]:
    """The residual added before the activation: a tensor of the input's shape, dtype and device;
    returns (name, parameter) of the activation (see :func:`check_residual_activation`)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != input.shape or residual.dtype != input.dtype:
        raise ValueError(
            f"residual must have the input's shape and dtype {tuple(input.shape)} {input.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype} (no broadcasting, no type promotion)"
        )
    if residual.device != input.device:
        raise ValueError(f"residual is on {residual.device}, the input on {input.device}")
    return check_residual_activation(activation, param, inplace)


def check_residual_activation(activation: str, param: Optional[float], inplace: bool):
    """(name, parameter) of an activation after a residual addition: one whose sign pattern the
    output keeps (identity, relu, leaky_relu with a slope > 0), so the backward reads it off y."""
    activation, param = check_activation(activation, param, inplace)
    if activation not in RESIDUAL_ACTIVATIONS or (activation == "leaky_relu" and not param > 0):
        raise ValueError(
            f"after a residual addition the activation must be one of {RESIDUAL_ACTIVATIONS} "
            f"(leaky_relu with a slope > 0), got {activation!r} with parameter {param}"
        )
    return activation, param


def check_untransformable(mask: bool = False, inplace: bool = False) -> None:
    """Options that have no torch.nn counterpart to run as under a torch.func transform."""
    what = "a mask" if mask else "inplace=True" if inplace else None
    if what:
        raise NotImplementedError(
            f"bnlab batch norm with {what} cannot run under a torch.func transform (vmap, grad, "
            "jacrev, ...): call it outside the transform, or without that option"
        )
