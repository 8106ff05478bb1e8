"""Batch-norm state between PyTorch's conventions and Keras's and Flax's, both ways.

The three frameworks evaluate the same function, ``gamma * (x - mean) / sqrt(var + eps) + beta``
per channel, from the same four arrays, under other names and rules (Keras 3
``keras.layers.BatchNormalization``; Flax ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm``;
torch.nn's ``BatchNorm*d``, whose conventions bnlab's layers keep):

==============  ========================  ============================  ====================
..              torch.nn / bnlab          Keras 3                       Flax (linen / nnx)
==============  ========================  ============================  ====================
names           weight, bias,             gamma, beta,                  params: scale, bias;
                running_mean,             moving_mean,                  batch_stats: mean, var
                running_var               moving_variance
momentum        new batch's weight m:     old value's weight d:         d, as Keras's;
                r = (1 - m) r + m b, 0.1  r = d r + (1 - d) b, 0.99     0.99
epsilon         1e-5                      1e-3                          1e-5
variance kept   unbiased (x n / (n - 1))  biased: E[x^2] - E[x]^2       biased, clipped at 0
channel axis    1: (N, C, *)              axis=-1: channels last        axis=-1
no gamma/beta   affine=False, bias=False  scale=False, center=False     use_scale, use_bias
==============  ========================  ============================  ====================

What converts exactly: the arrays, as values (bitwise; the eval function is ``var + eps`` either
way), epsilon as is, and momentum as its complement ``1 - d``, computed in decimal so that the
momenta people write convert to the ones they would write (0.99 <-> 0.01, 0.9 <-> 0.1), where
float subtraction gives 0.010000000000000009 and 0.09999999999999998.

What does not: the *update* of the stored variance. A stored variance is an average over past
batches, each of its own size n, so it cannot be re-biased afterwards; it converts as a value. In
continued training, from the same state, one batch moves the running means identically and the
variances by ``m * var_b / (n - 1)`` more in torch (``var_b``: the batch's biased variance, n:
values per channel; negligible for images, not for a small dense batch). Keras and Flax keep no
``num_batches_tracked``: it converts to 0 (it matters only for torch's ``momentum=None``).

Layout: a torch layer takes channels on dim 1. A Keras or Flax layer that normalizes the last axis
of (N, H, W, C) data converts to one for (N, C, H, W): feed it ``x.movedim(-1, 1)``.
"""

from __future__ import annotations

import decimal
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    ConversionWarning,
    set_statistics,
)

__all__ = [
    "momentum_to_torch",
    "momentum_from_torch",
    "TorchBatchNorm",
    "KerasBatchNorm",
    "FlaxBatchNorm",
    "to_keras",
    "from_keras",
    "to_flax",
    "from_flax",
    "batch_norm_from_keras",
]

_TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_KERAS_KEYS = ("gamma", "beta", "moving_mean", "moving_variance")  # Keras's get_weights() order
_KERAS_RENORM_KEYS = ("moving_stddev", "renorm_mean", "renorm_stddev")
_FLAX_PARAMS, _FLAX_STATS = ("scale", "bias"), ("mean", "var")
_KERAS_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-3}
_FLAX_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-5}
_DECIMAL = decimal.Context(prec=400)  # 1 - d is exact in it for every float d in [0, 1]


# --------------------------------------------------------------------------- momentum


def _complement(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(_DECIMAL.subtract(decimal.Decimal(1), decimal.Decimal(repr(value))))


def momentum_to_torch(decay: float) -> float:
    """torch's momentum (the new batch's weight) for a Keras / Flax momentum (the decay, the old
    value's weight): ``1 - decay`` on ``repr(decay)``, in decimal: 0.99 gives 0.01 and 0.9 gives
    0.1 (float subtraction: 0.010000000000000009, 0.09999999999999998), and back through
    :func:`momentum_from_torch` exactly, for every momentum written with at most 15 decimals."""
    return _complement(decay, "decay (the Keras / Flax momentum)")


def momentum_from_torch(momentum: Optional[float]) -> float:
    """The Keras / Flax momentum (decay) for torch's ``momentum``: ``1 - momentum``, in decimal
    (see :func:`momentum_to_torch`). torch's ``momentum=None`` (a cumulative average over
    ``num_batches_tracked``) has no decay: ValueError."""
    if momentum is None:
        raise ValueError(
            "momentum=None (torch's cumulative average over num_batches_tracked) has no Keras / "
            "Flax equivalent, which always decay exponentially: pass momentum=<a torch momentum>"
        )
    return _complement(momentum, "momentum (torch's)")


# --------------------------------------------------------------------------- results


class TorchBatchNorm(NamedTuple):
    """A torch / bnlab batch norm's state: ``state_dict`` (torch.nn's keys, tensors of the source's
    dtype) and ``kwargs`` for the constructor (``num_features``, ``eps``, ``momentum``,
    ``affine``, ``dtype``, and ``bias=False`` for gamma without beta). ``frozen``: parameters the
    source framework did not have (a weight of ones for Keras ``scale=False`` with
    ``center=True``); :meth:`build` makes them ``requires_grad=False`` so training matches."""

    state_dict: dict[str, Tensor]
    kwargs: dict[str, Any]
    frozen: tuple[str, ...] = ()

    def build(self, cls: Optional[type] = None, **kwargs) -> nn.Module:
        """``cls(**self.kwargs, **kwargs)`` with this state loaded: bnlab.nn.BatchNorm (any rank,
        channels on dim 1) by default, or e.g. bnlab.nn.BatchNorm2d, torch.nn.BatchNorm2d."""
        layer = (BatchNorm if cls is None else cls)(**{**self.kwargs, **kwargs})
        layer.load_state_dict(self.state_dict)
        for name in self.frozen:
            getattr(layer, name).requires_grad_(False)
        return layer


class KerasBatchNorm(NamedTuple):
    """A Keras layer's state: ``weights`` (numpy arrays, in Keras's ``get_weights()`` order, so
    ``layer.set_weights(list(weights.values()))`` loads them into a built layer) and ``config``
    (``keras.layers.BatchNormalization(**config)``)."""

    weights: dict[str, np.ndarray]
    config: dict[str, Any]


class FlaxBatchNorm(NamedTuple):
    """A Flax layer's state: ``variables`` (``{'params': {'scale', 'bias'}, 'batch_stats':
    {'mean', 'var'}}`` of numpy arrays, linen's ``apply`` format; ``'params'`` left out when
    empty) and ``config`` (``flax.linen.BatchNorm(**config)``)."""

    variables: dict[str, dict[str, np.ndarray]]
    config: dict[str, Any]


# --------------------------------------------------------------------------- arrays


def _numpy(value, name: str) -> np.ndarray:
    """A copy of ``value`` as a 1-D-or-more floating numpy array: torch tensors, numpy arrays, Keras
    variables (``.numpy()``), Flax nnx variables (``.value``), jax arrays, lists."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.numpy().copy()
    if not isinstance(value, np.ndarray):
        if callable(getattr(value, "numpy", None)):
            value = value.numpy()
        elif hasattr(value, "value"):
            return _numpy(value.value, name)
    array = np.array(value, copy=True)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
    return array


def _tensor(array: np.ndarray) -> Tensor:
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_shapes(arrays: Mapping[str, Optional[np.ndarray]], where: str) -> int:
    shapes = {name: a.shape for name, a in arrays.items() if a is not None}
    num_features = {s[0] if len(s) == 1 else None for s in shapes.values()}
    if len(num_features) != 1 or None in num_features or 0 in num_features:
        raise ValueError(
            f"{where}: expected 1-D per-channel arrays of one length C >= 1, got shapes {shapes}"
            " (a Flax axis of several feature axes has no torch equivalent)"
        )
    return num_features.pop()


def _torch_result(gamma, beta, mean, var, momentum: float, eps, where: str) -> TorchBatchNorm:
    num_features = _check_shapes({"gamma": gamma, "beta": beta, "mean": mean, "var": var}, where)
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"{where}: epsilon must be > 0, got {eps}")
    kwargs: dict[str, Any] = {
        "num_features": num_features,
        "eps": eps,
        "momentum": momentum,
        "affine": gamma is not None or beta is not None,
        "dtype": _tensor(mean).dtype,
    }
    state: dict[str, Tensor] = {}
    frozen: tuple[str, ...] = ()
    if gamma is None and beta is not None:  # torch has no bias without a weight: ones, frozen
        gamma, frozen = np.ones_like(beta), ("weight",)
    if gamma is not None:
        state["weight"] = _tensor(gamma)
        if beta is None:
            kwargs["bias"] = False
        else:
            state["bias"] = _tensor(beta)
    state["running_mean"] = _tensor(mean)
    state["running_var"] = _tensor(var)
    state["num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return TorchBatchNorm(state, kwargs, frozen)


def _torch_state(source, prefix: str, momentum, eps) -> tuple[dict, float, float, str]:
    """(arrays by torch name, torch momentum, eps, a name for errors) of a batch norm module, a
    model's submodule at ``prefix``, or a state dict's entries under ``prefix``."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    if isinstance(source, nn.Module):
        module = source.get_submodule(prefix[:-1]) if prefix else source
        where = f"{type(module).__name__} {prefix[:-1]!r}" if prefix else type(module).__name__
        state = module.state_dict()
        if momentum is None:
            momentum = getattr(module, "momentum", 0.1)
        if eps is None:
            eps = getattr(module, "eps", 1e-5)
    elif isinstance(source, Mapping):
        where = f"state dict{f' under {prefix!r}' if prefix else ''}"
        state = {
            key[len(prefix) :]: value for key, value in source.items() if key.startswith(prefix)
        }
        momentum = 0.1 if momentum is None else momentum
        eps = 1e-5 if eps is None else eps
    else:
        raise TypeError(
            f"expected a torch batch-norm module or a state dict, got {type(source).__name__}"
        )
    unexpected = sorted(set(state) - set(_TORCH_KEYS))
    if unexpected:
        raise ValueError(
            f"{where}: unexpected entries {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}; "
            f"a batch norm's state has {list(_TORCH_KEYS)} (pass prefix= to pick one layer of a "
            "model, e.g. prefix='layer1.0.bn1.')"
        )
    missing = [key for key in ("running_mean", "running_var") if state.get(key) is None]
    if missing:
        raise ValueError(
            f"{where}: no {' / '.join(missing)} (track_running_stats=False?); Keras and Flax "
            "layers always keep running statistics"
        )
    arrays = {
        key: None if state.get(key) is None else _numpy(state[key], f"{where} {key}")
        for key in _TORCH_KEYS[:4]
    }
    _check_shapes(arrays, where)
    return arrays, momentum, float(eps), where


def _drop_or_fill(array, wanted: Optional[bool], fill: float, flag: str, name: str, where, like):
    """The torch array for a Keras / Flax parameter: kept when ``wanted`` is None (as present), a
    ``fill`` array when wanted but absent, dropped when not wanted (only if it equals ``fill``)."""
    if wanted is None:
        return array
    if not wanted:
        if array is not None and not np.all(array == fill):
            raise ValueError(
                f"{where}: {flag}=False drops {name}, which is not all {fill:g}: the converted "
                "layer would compute something else"
            )
        return None
    return np.full_like(like, fill) if array is None else array


# --------------------------------------------------------------------------- Keras


def to_keras(
    source,
    prefix: str = "",
    *,
    momentum: Optional[float] = None,
    eps: Optional[float] = None,
    axis: int = -1,
    center: Optional[bool] = None,
    scale: Optional[bool] = None,
) -> KerasBatchNorm:
    """A torch / bnlab batch norm's state as a Keras 3 ``BatchNormalization``'s.

    ``source``: a batch-norm module, a model with ``prefix`` naming the layer ('layer1.0.bn1'),
    or a state dict (a layer's, or a model's with ``prefix``). ``momentum`` and ``eps`` are
    torch's (the module's by default; for a state dict 0.1 and 1e-5); the config gets the decay
    ``1 - momentum`` (:func:`momentum_from_torch`) and the epsilon as is, so the Keras layer
    evaluates the same function, whatever Keras's defaults. ``axis``: the axis the Keras layer
    normalizes, -1 (Keras's default) for channels-last data, 1 for torch's layout.

    ``center`` / ``scale`` (Keras's beta / gamma): None keeps what the source has (torch
    ``affine=False``: neither; ``bias=False``: no beta); True adds a missing one (zeros / ones);
    False drops one, which must then be exactly zeros / ones.

    ``running_var`` (an average of unbiased batch variances) becomes ``moving_variance`` as is;
    Keras's later updates average biased ones (see the module's docstring).
    """
    arrays, momentum, eps, where = _torch_state(source, prefix, momentum, eps)
    mean = arrays["running_mean"]
    gamma = _drop_or_fill(arrays["weight"], scale, 1.0, "scale", "the weight", where, mean)
    beta = _drop_or_fill(arrays["bias"], center, 0.0, "center", "the bias", where, mean)
    weights = {"gamma": gamma, "beta": beta, "moving_mean": mean}
    weights["moving_variance"] = arrays["running_var"]
    config = {
        "axis": int(axis),
        "momentum": momentum_from_torch(momentum),
        "epsilon": eps,
        "center": beta is not None,
        "scale": gamma is not None,
    }
    return KerasBatchNorm({k: v for k, v in weights.items() if v is not None}, config)


def _check_keras_config(config: Mapping, where: str) -> None:
    if config.get("renorm"):
        raise ValueError(
            f"{where}: renorm=True (batch renormalization: r / d corrections and renorm_momentum "
            "in training) cannot be reproduced by a batch norm; its eval uses moving_mean and "
            "moving_variance like any layer's: for eval alone convert the weights without the "
            "config, or train with bnlab.nn.BatchRenorm"
        )
    if config.get("synchronized"):
        raise ValueError(
            f"{where}: synchronized=True (cross-replica statistics) is not converted; convert "
            "without it and use bnlab.nn.convert_sync_batchnorm on the torch model"
        )
    for option in ("virtual_batch_size", "adjustment"):  # tf.keras 2's layer
        if config.get(option) is not None:
            raise ValueError(
                f"{where}: {option}={config[option]!r} (tf.keras) cannot be reproduced by a batch "
                "norm"
            )
    axis = config.get("axis", -1)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"{where}: axis={list(axis)} normalizes several axes together; a torch batch norm"
                " has one channel axis"
            )


def from_keras(
    weights,
    config: Optional[Mapping] = None,
    *,
    momentum: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> TorchBatchNorm:
    """A Keras ``BatchNormalization``'s state as a torch / bnlab batch norm's.

    ``weights``: a dict by Keras's names (``gamma`` and ``beta`` when the layer has them,
    ``moving_mean``, ``moving_variance``; numpy arrays, Keras variables or tensors), or the list
    ``layer.get_weights()`` with ``config`` saying ``center`` / ``scale``. ``config``: the layer's
    ``get_config()`` (momentum, epsilon, center, scale; renorm, synchronized refused); ``momentum``
    (the Keras decay) and ``epsilon`` override it; Keras's defaults 0.99 and 1e-3 otherwise.

    Returns torch's momentum ``1 - decay`` (:func:`momentum_to_torch`) and the epsilon as is; the
    variance as is (Keras stores an average of biased batch variances; torch's later updates
    average unbiased ones: see the module's docstring). No beta: ``bias=False``; no gamma: a weight
    of ones, frozen by :meth:`TorchBatchNorm.build`; neither: ``affine=False``. The torch layer
    takes channels on dim 1, whatever the Keras ``axis``.
    """
    config = dict(config or {})
    where = f"Keras layer {config['name']!r}" if "name" in config else "Keras weights"
    _check_keras_config(config, where)
    if isinstance(weights, Mapping):
        renorm = [key for key in _KERAS_RENORM_KEYS if key in weights]
        if renorm:
            raise ValueError(
                f"{where}: {renorm} are batch renormalization's (renorm=True), which a batch norm"
                " cannot reproduce in training; for eval alone pass only "
                f"{list(_KERAS_KEYS)}"
            )
        unexpected = sorted(set(weights) - set(_KERAS_KEYS))
        missing = [key for key in _KERAS_KEYS[2:] if key not in weights]
        if unexpected or missing:
            raise ValueError(
                f"{where}: expected keys {list(_KERAS_KEYS)} (gamma / beta optional), got "
                f"{sorted(weights)}: missing {missing}, unexpected {unexpected}"
            )
        for flag, key in (("scale", "gamma"), ("center", "beta")):
            if flag in config and bool(config[flag]) != (key in weights):
                raise ValueError(
                    f"{where}: config {flag}={config[flag]} but {key} is "
                    f"{'present' if key in weights else 'absent'}"
                )
        named = dict(weights)
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        names = [
            key
            for key, present in zip(
                _KERAS_KEYS, (config.get("scale", True), config.get("center", True), True, True)
            )
            if present
        ]
        if len(weights) != len(names):
            raise ValueError(
                f"{where}: get_weights() of a layer with scale={config.get('scale', True)}, "
                f"center={config.get('center', True)} is {names}: {len(names)} arrays, got "
                f"{len(weights)}"
            )
        named = dict(zip(names, weights))
    else:
        raise TypeError(
            f"{where}: expected a dict of {list(_KERAS_KEYS)} or the list get_weights(), got "
            f"{type(weights).__name__}"
        )
    arrays = {key: _numpy(value, f"{where} {key}") for key, value in named.items()}
    decay = config.get("momentum", _KERAS_DEFAULTS["momentum"]) if momentum is None else momentum
    epsilon = config.get("epsilon", _KERAS_DEFAULTS["epsilon"]) if epsilon is None else epsilon
    return _torch_result(
        arrays.get("gamma"),
        arrays.get("beta"),
        arrays["moving_mean"],
        arrays["moving_variance"],
        momentum_to_torch(decay),
        epsilon,
        where,
    )


def _input_rank(layer) -> Optional[int]:
    ndim = getattr(getattr(layer, "input_spec", None), "ndim", None)
    return ndim if isinstance(ndim, int) else None


def _expected_dims(cls: type) -> tuple[int, ...]:
    dims = getattr(cls, "expected_dims", None)
    if dims is not None:
        return tuple(dims)
    for torch_cls, dims in (
        (nn.BatchNorm1d, (2, 3)),
        (nn.BatchNorm2d, (4,)),
        (nn.BatchNorm3d, (5,)),
    ):
        if isinstance(cls, type) and issubclass(cls, torch_cls):
            return dims
    return ()


def batch_norm_from_keras(layer, cls: Optional[type] = None, **kwargs) -> nn.Module:
    """A torch / bnlab batch norm that evaluates as the built Keras ``BatchNormalization``
    ``layer`` does, with its state and its momentum (as torch's, ``1 - momentum``) and epsilon.

    ``cls``: the class to build (bnlab.nn.BatchNorm1d/2d/3d, torch.nn.BatchNorm1d/2d/3d, ...); by
    default bnlab's for the layer's input rank (2 or 3: 1d, 4: 2d, 5: 3d). ``kwargs`` go to it
    (e.g. ``device``). num_features comes from the weights; the dtype is theirs.

    Layout: the torch layer takes channels on dim 1. A Keras layer with ``axis=-1`` (its default)
    on (N, H, W, C) input becomes one for (N, C, H, W): ``torch_layer(x.movedim(-1, 1))`` equals
    ``keras_layer(x)`` moved the same way (for 2-D (N, C) input the layouts agree).

    A layer with ``trainable=False`` (which Keras then runs in inference mode) gets frozen
    parameters and, for bnlab's classes, ``statistics='running'`` (see bnlab.nn.set_statistics);
    a torch.nn class cannot hold that, and a ConversionWarning says so. Regularizers and
    constraints (training options of Keras's) are not carried: a ConversionWarning names them.
    renorm, synchronized (and tf.keras's virtual_batch_size, adjustment) raise ValueError.
    """
    if not hasattr(layer, "moving_variance") or not callable(getattr(layer, "get_config", None)):
        raise TypeError(
            f"expected a Keras BatchNormalization layer, got {type(layer).__name__} (for arrays "
            "use from_keras)"
        )
    config = dict(layer.get_config())
    where = f"Keras layer {config.get('name', type(layer).__name__)!r}"
    _check_keras_config(config, where)
    if layer.moving_variance is None:
        raise ValueError(
            f"{where} is not built (no weights yet): call it on an input or layer.build(shape)"
        )
    weights = {
        key: getattr(layer, key) for key in _KERAS_KEYS if getattr(layer, key, None) is not None
    }
    result = from_keras(weights, config)
    rank = _input_rank(layer)
    if cls is None:
        cls = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}.get(rank, BatchNorm)
    dims = _expected_dims(cls)
    if rank is not None and dims and rank not in dims:
        raise ValueError(
            f"{where} takes {rank}-D input, {cls.__name__} takes {' or '.join(map(str, dims))}-D:"
            " pass a cls for that rank (or bnlab.nn.BatchNorm, any rank)"
        )
    built = result.build(cls, **kwargs)
    unused = [
        key
        for key in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint")
        if config.get(key) is not None
    ]
    if unused:
        warnings.warn(
            f"{where}: {', '.join(unused)} not carried over (training options: add them to the "
            "torch loss / optimizer step)",
            ConversionWarning,
            stacklevel=2,
        )
    if not config.get("trainable", True):
        built.requires_grad_(False)
        if isinstance(built, BatchNorm):
            set_statistics(built, "running")
        else:
            warnings.warn(
                f"{where} has trainable=False, which Keras runs in inference mode; "
                f"{type(built).__name__} normalizes with batch statistics under .train(): keep it "
                "in .eval() or build a bnlab class (statistics='running')",
                ConversionWarning,
                stacklevel=2,
            )
    return built


# --------------------------------------------------------------------------- Flax


def to_flax(
    source,
    prefix: str = "",
    *,
    momentum: Optional[float] = None,
    eps: Optional[float] = None,
    axis: int = -1,
    use_bias: Optional[bool] = None,
    use_scale: Optional[bool] = None,
) -> FlaxBatchNorm:
    """A torch / bnlab batch norm's state as a Flax ``BatchNorm``'s: linen's variables
    ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` (the same names as an
    nnx.BatchNorm's attributes) and a config ``{'axis', 'momentum', 'epsilon', 'use_bias',
    'use_scale'}`` for ``flax.linen.BatchNorm(**config)``.

    Arguments as :func:`to_keras`'s (``use_bias`` / ``use_scale`` for ``center`` / ``scale``). The
    momentum becomes the decay ``1 - momentum``; ``running_var`` becomes ``var`` as is (Flax's
    updates average biased batch variances: see the module's docstring).
    """
    arrays, momentum, eps, where = _torch_state(source, prefix, momentum, eps)
    mean = arrays["running_mean"]
    scale = _drop_or_fill(arrays["weight"], use_scale, 1.0, "use_scale", "the weight", where, mean)
    bias = _drop_or_fill(arrays["bias"], use_bias, 0.0, "use_bias", "the bias", where, mean)
    params = {key: a for key, a in (("scale", scale), ("bias", bias)) if a is not None}
    variables = {"params": params} if params else {}
    variables["batch_stats"] = {"mean": mean, "var": arrays["running_var"]}
    config = {
        "axis": int(axis),
        "momentum": momentum_from_torch(momentum),
        "epsilon": eps,
        "use_bias": bias is not None,
        "use_scale": scale is not None,
    }
    return FlaxBatchNorm(variables, config)


def from_flax(
    variables: Mapping,
    config: Optional[Mapping] = None,
    *,
    momentum: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> TorchBatchNorm:
    """A Flax ``BatchNorm``'s state as a torch / bnlab batch norm's.

    ``variables``: one layer's linen variables ``{'params': {'scale', 'bias'}, 'batch_stats':
    {'mean', 'var'}}`` (e.g. ``{c: v['BatchNorm_0'] for c, v in model_vars.items()}``), or an
    nnx.BatchNorm's flat ``{'scale', 'bias', 'mean', 'var'}``; jax or numpy arrays or nnx
    variables. ``config``: the layer's fields (``momentum``, ``epsilon``, ``use_bias``,
    ``use_scale``); ``momentum`` (the decay) and ``epsilon`` override it; Flax's defaults 0.99 and
    1e-5 otherwise. Conversions as :func:`from_keras`'s.
    """
    config = dict(config or {})
    where = "Flax variables"
    if not isinstance(variables, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(variables).__name__}")
    if "batch_stats" in variables or "params" in variables:
        unexpected = sorted(set(variables) - {"params", "batch_stats"})
        if unexpected or "batch_stats" not in variables:
            raise ValueError(
                f"{where}: expected collections 'params' (optional) and 'batch_stats', got "
                f"{sorted(variables)}"
            )
        params, stats = dict(variables.get("params", {})), dict(variables["batch_stats"])
    else:
        params = {k: v for k, v in variables.items() if k in _FLAX_PARAMS}
        stats = {k: v for k, v in variables.items() if k not in _FLAX_PARAMS}
    bad = sorted(set(params) - set(_FLAX_PARAMS)) + sorted(set(stats) - set(_FLAX_STATS))
    missing = [key for key in _FLAX_STATS if key not in stats]
    if bad or missing:
        raise ValueError(
            f"{where}: expected params {list(_FLAX_PARAMS)} (optional) and batch_stats "
            f"{list(_FLAX_STATS)}: missing {missing}, unexpected {bad} (pass one layer's "
            "variables, e.g. variables['batch_stats']['BatchNorm_0'])"
        )
    for flag, key in (("use_scale", "scale"), ("use_bias", "bias")):
        if flag in config and bool(config[flag]) != (key in params):
            raise ValueError(
                f"{where}: config {flag}={config[flag]} but {key} is "
                f"{'present' if key in params else 'absent'}"
            )
    axis = config.get("axis", -1)
    if isinstance(axis, (list, tuple)) and len(axis) != 1:
        raise ValueError(
            f"{where}: axis={axis} has several feature axes; a torch batch norm has one "
            "channel axis"
        )
    arrays = {key: _numpy(value, f"{where} {key}") for key, value in {**params, **stats}.items()}
    decay = config.get("momentum", _FLAX_DEFAULTS["momentum"]) if momentum is None else momentum
    epsilon = config.get("epsilon", _FLAX_DEFAULTS["epsilon"]) if epsilon is None else epsilon
    return _torch_result(
        arrays.get("scale"),
        arrays.get("bias"),
        arrays["mean"],
        arrays["var"],
        momentum_to_torch(decay),
        epsilon,
        where,
    )
