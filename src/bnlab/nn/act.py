"""Batch norm fused with its activation, and the in-place activated mode that keeps only the output.

Parameters, buffers and ``state_dict`` are those of :class:`bnlab.nn.BatchNorm2d` (and torch.nn's),
so a checkpoint of ``BatchNorm2d`` followed by an activation loads into ``BatchNormAct2d`` and
``InPlaceABN2d`` unchanged.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import functional as F
from ..checks import check_activation
from ..kernels.composite import activate
from .batchnorm import BatchNorm

__all__ = [
    "BatchNormAct",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "InPlaceABN",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
]


class BatchNormAct(BatchNorm):
    r"""``act(BatchNorm(x))`` in one fused op (see :func:`bnlab.functional.batch_norm_act`).

    Args: those of :class:`bnlab.nn.BatchNorm`, plus

        activation: "identity", "relu", "leaky_relu", "elu", "silu" (swish), "hardswish",
            "hardsigmoid", "gelu" (exact, erf) or "gelu_tanh" (torch's ``approximate="tanh"``),
            each as torch.nn.functional defines it (:mod:`bnlab.kernels.contract` has the table).
        activation_param: leaky_relu's negative slope (default 0.01) or elu's alpha (default 1);
            the other activations take none.
    """

    inplace = False
    _default_activation = "relu"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = None,
        activation_param: Optional[float] = None,
        bias: bool = True,
        strict: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            strict=strict,
            backend=backend,
        )
        self.activation, self.activation_param = F.check_activation(
            activation or self._default_activation, activation_param, self.inplace
        )

    def forward(self, input: Tensor) -> Tensor:
        if not self.inplace:  # the in-place mode always runs fused
            out = self._eager(input, self.activation, self.activation_param)
            if out is not None:
                return out
        self._check_input_dim(input)
        if self._mixing():  # prediction-time statistics (set_statistics): never in place
            weight = self.weight
            if self.inplace and weight is not None:  # as the in-place op takes gamma
                weight = weight.abs() + self.eps
            activation, param = check_activation(self.activation, self.activation_param, False)
            return activate(self._mixed(input, weight=weight), activation, param)
        return F.batch_norm_act(
            input,
            **self._functional_args(),
            activation=self.activation,
            activation_param=self.activation_param,
            inplace=self.inplace,
            strict=self.strict,
            backend=self.backend,
        )

    def _concat_activation(self) -> Optional[tuple[str, Optional[float]]]:
        if self.inplace or type(self).forward is not BatchNormAct.forward:
            return None
        return self.activation, self.activation_param

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.activation in ("leaky_relu", "elu"):
            text += f", activation_param={self.activation_param}"
        return text


class BatchNormAct1d(BatchNormAct):
    """Fused batch norm + activation over (N, C) or (N, C, L); see :class:`BatchNormAct`."""

    expected_dims = (2, 3)


class BatchNormAct2d(BatchNormAct):
    """Fused batch norm + activation over (N, C, H, W); see :class:`BatchNormAct`."""

    expected_dims = (4,)


class BatchNormAct3d(BatchNormAct):
    """Fused batch norm + activation over (N, C, D, H, W); see :class:`BatchNormAct`."""

    expected_dims = (5,)


class InPlaceABN(BatchNormAct):
    r"""In-place activated batch norm (Rota Bulo et al., CVPR 2018): ``act(BatchNorm(x))`` written
    over x, keeping only the output for the backward.

    The activation must be invertible: "leaky_relu" (default, slope 0.01), "elu" or "identity";
    any other is refused at construction with an error naming these (relu, silu, hardswish,
    hardsigmoid, gelu and gelu_tanh map two inputs to one output: use :class:`BatchNormAct`).
    gamma enters as |gamma| + eps. Its input must not be needed by the op that produced it (put it
    after a conv or linear layer, which keep their own input); the saving is that the conv output
    and the normalized tensor share one buffer.
    """

    inplace = True
    _default_activation = "leaky_relu"


class InPlaceABN1d(InPlaceABN):
    """In-place activated batch norm over (N, C) or (N, C, L); see :class:`InPlaceABN`."""

    expected_dims = (2, 3)


class InPlaceABN2d(InPlaceABN):
    """In-place activated batch norm over (N, C, H, W); see :class:`InPlaceABN`."""

    expected_dims = (4,)


class InPlaceABN3d(InPlaceABN):
    """In-place activated batch norm over (N, C, D, H, W); see :class:`InPlaceABN`."""

    expected_dims = (5,)
