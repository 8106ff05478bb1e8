"""Layer norm module: a drop-in replacement for torch.nn.LayerNorm."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .tracing import WholeWhenTraced, whole_when_traced

__all__ = ["LayerNorm"]


class LayerNorm(WholeWhenTraced, nn.Module):
    r"""Layer normalization (Ba, Kiros & Hinton 2016, https://arxiv.org/abs/1607.06450).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics over the trailing ``normalized_shape`` dims of each example, identical in training
    and inference. Arguments, parameters and ``state_dict`` as torch.nn.LayerNorm.

    Args:
        normalized_shape: the trailing shape normalized over (an int for the last dim).
        eps: added to the variance.
        elementwise_affine: learn gamma (init 1) and, if ``bias``, beta (init 0) of that shape.
        bias: learn beta (with ``elementwise_affine``).
        backend: kernel backend (see :mod:`bnlab.kernels`); None chooses automatically.

    Shape:
        input and output (*, *normalized_shape).
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    backend: Optional[str] = None  # class-level default too, for modules built by bnlab.convert

    def __init__(
        self,
        normalized_shape: Union[int, Sequence[int]],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.elementwise_affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    @whole_when_traced
    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text
