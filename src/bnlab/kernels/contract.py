"""The backend contract, written once: what every kernel backend's functions take and return.

A backend (:mod:`bnlab.kernels.composite`, :mod:`~bnlab.kernels.native`, :mod:`~bnlab.kernels.cpu`,
:mod:`~bnlab.kernels.gpu`, or one a user registers) is a module with the functions of
:class:`Kernels` for the ops it supports. They are plain functions: no autograd inside, no running
statistics (bnlab owns those, :mod:`bnlab.statistics`), no argument checks (:mod:`bnlab.checks`).

Conventions, the same for batch norm and layer norm:

- statistics come back as (mean, var): var is the *biased* variance (divide by m), and every
  kernel computes invstd = 1 / sqrt(var + eps) from it itself (the running variance needs var);
- float16/bfloat16 inputs are computed in float32; statistics and parameter gradients come back in
  the accumulation dtype (:func:`bnlab.kernels.composite.accumulation_dtype`);
- outputs are shaped and laid out like the input (:func:`~bnlab.kernels.composite.laid_out_like`);
- a gradient whose ``output_mask`` entry is False comes back as None (dweight also without weight).

A backend with fused kernels only gets the plain ones from :func:`plain_from_fused`; every backend's
``batch_norm_act_forward`` / ``_backward`` (their signatures and defaults, the in-place mode's
check) come from :func:`bnlab.kernels.composite.activated` / ``activated_backward``, over its
fused kernels or its plain ones.

The fused activations (:data:`ACTIVATIONS`), z the pre-activation and p the parameter, each with
torch.nn.functional's definition and, at the kinks, the branch its backward takes:

========================  ============================================  ===========================
name                      act(z)                                        act'(z)
========================  ============================================  ===========================
``identity``              z                                             1
``relu``                  max(z, 0)                                     1 if z > 0 else 0
``leaky_relu``            z if z > 0 else p z (slope p)                 1 if z > 0 else p
``elu``                   z if z > 0 else p (exp(z) - 1) (alpha p)      1 if z > 0 else p exp(z)
``silu`` (swish)          z sigmoid(z)                                  s (1 + z (1 - s)),
                                                                        s = sigmoid(z)
``hardswish``             z min(max(z + 3, 0), 6) / 6                   0 if z <= -3, z / 3 + 1/2
                                                                        if z < 3, else 1
``hardsigmoid``           min(max(z + 3, 0), 6) / 6                     1/6 if -3 < z < 3 else 0
``gelu``                  z Phi(z) = z (1 + erf(z / sqrt(2))) / 2       Phi(z) + z phi(z)
``gelu_tanh``             z (1 + t) / 2, t = tanh(sqrt(2 / pi)          (1 + t) / 2 + z (1 - t^2)
                          (z + 0.044715 z^3)) (torch's                  sqrt(2 / pi) (1 + 3 *
                          ``approximate="tanh"``)                       0.044715 z^2) / 2
========================  ============================================  ===========================

Only the strictly increasing ones, :data:`INVERTIBLE_ACTIVATIONS` (leaky_relu and elu with p > 0),
can be undone from the output (``from_output``, the in-place mode): silu, gelu and hardswish have a
minimum (two z for one y), relu and hardsigmoid are flat on a half-line.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from torch import Tensor

from ..statistics import RunningStatistics

Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]

# what a backend of batch-norm kernels without masked statistics runs (see bnlab.kernels.OPS)
UNMASKED_BATCH_NORM_OPS = (
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_act",
    "batch_norm_act_eval",
)

ACTIVATIONS = (
    "identity",
    "relu",
    "leaky_relu",
    "elu",
    "silu",
    "hardswish",
    "hardsigmoid",
    "gelu",
    "gelu_tanh",
)
INVERTIBLE_ACTIVATIONS = ("identity", "leaky_relu", "elu")


def require_invertible(activation: str) -> None:
    """Raise unless a backward from the output (``from_output``) can recover z from y = act(z)."""
    if activation not in INVERTIBLE_ACTIVATIONS:
        raise ValueError(
            f"a backward from the output inverts the activation; {activation!r} is not "
            f"invertible, expected one of {INVERTIBLE_ACTIVATIONS}"
        )


class Kernels(Protocol):
    """The functions of a backend module (each only for the ops its ``supports`` accepts)."""

    def batch_statistics(self, x: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, biased var) over dims (0, 2, 3, ...), or over ``mask``'s True
        positions (mask (N, *spatial))."""

    def batch_norm_forward(
        self,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        eps: float,
        mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """y = (x - mean) * invstd * weight + bias per channel, invstd = 1 / sqrt(var + eps).

        Training: mean and biased var of the batch (:meth:`batch_statistics`), returned; with a
        ``mask`` over its True positions only (every position is still normalized). Eval: the
        running statistics normalize, the mask is ignored, the returned mean/var are empty.
        Returns (y, mean, var).
        """

    def batch_norm_backward(
        self,
        grad_out: Tensor,
        x: Tensor,
        weight: Optional[Tensor],
        mean: Optional[Tensor],
        var: Optional[Tensor],
        training: bool,
        eps: float,
        output_mask: Sequence[bool] = (True, True, True),
        mask: Optional[Tensor] = None,
    ) -> Grads:
        """Gradients of :meth:`batch_norm_forward` (Ioffe & Szegedy 2015, section 3, the chain
        rule through the batch statistics, in its compact form). Training, with
        xhat = (x - mean) * invstd and m values per channel::

            dx = weight * invstd * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m)
            dweight = sum(dy * xhat),  dbias = sum(dy)

        With a ``mask``, m counts the valid positions and the statistics' terms apply to them
        only; the sums run over every position. Eval: dx = dy * weight * invstd. ``mean``/``var``
        are the saved batch statistics (training) or the running ones (eval); None in training:
        recomputed from x. Returns (dx, dweight, dbias).
        """

    def batch_norm_act_forward(
        self,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        eps: float,
        activation: str = "identity",
        param: float = 0.0,
        out: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """y = act(batch_norm(x)), ``activation`` one of :data:`ACTIVATIONS` (the table above;
        ``param``: leaky_relu's slope, elu's alpha, 0.0 for the others), written into ``out`` when
        given (it may be x: the in-place mode, for the invertible activations); with a
        ``residual`` (shaped as x), y = act(batch_norm(x) + residual), the residual unit of He et
        al. 2016 (identity, relu and leaky_relu). Returns (y, mean, var) as
        :meth:`batch_norm_forward`."""

    def batch_norm_act_backward(
        self,
        grad_out: Tensor,
        saved: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        activation: str = "identity",
        param: float = 0.0,
        output_mask: Sequence[bool] = (True, True, True),
        from_output: bool = False,
    ) -> Grads:
        """Gradients of :meth:`batch_norm_act_forward`: :meth:`batch_norm_backward` of
        dz = dy * act'(z) (act' with the branches at the kinks of the table above), z = (x - mean)
        * invstd * weight + bias the pre-activation, recomputed from ``saved`` = x (nothing else
        is kept). ``from_output`` (the in-place mode, :data:`INVERTIBLE_ACTIVATIONS` only, others
        raise :class:`ValueError`): ``saved`` is the output y, z = act^-1(y) and x - mean =
        (z - bias) / (weight * invstd), which needs a weight without zeros."""

    def layer_norm_forward(
        self,
        x: Tensor,
        normalized_shape: Sequence[int],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """y = (x - mean) * invstd * weight + bias, statistics over the trailing
        ``normalized_shape`` dims of each example. Returns (y, mean, var), mean and var keeping
        the reduced dims as size 1."""

    def layer_norm_backward(
        self,
        grad_out: Tensor,
        x: Tensor,
        normalized_shape: Sequence[int],
        weight: Optional[Tensor],
        mean: Optional[Tensor],
        var: Optional[Tensor],
        eps: float,
        output_mask: Sequence[bool] = (True, True, True),
    ) -> Grads:
        """Gradients of :meth:`layer_norm_forward` (Ba, Kiros & Hinton 2016). With
        g = dy * weight and means over the normalized dims::

            dx = invstd * (g - mean(g) - xhat * mean(g * xhat))
            dweight = sum_batch(dy * xhat),  dbias = sum_batch(dy)

        ``mean``/``var`` None: recomputed from x (keeps second derivatives exact)."""


class EagerBatchNorm(Protocol):
    """Optional, as a backend's ``eager_batch_norm``: the whole eager batch norm (no mask) with
    the backend's own autograd and running-statistics update (``native``: one differentiable ATen
    call). It returns None for a call it leaves to bnlab's autograd Function over its kernels."""

    def __call__(
        self,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running: RunningStatistics,
        training: bool,
        eps: float,
        strict: bool,
        activation: str = "identity",
        param: float = 0.0,
    ) -> Optional[Tensor]:
        """y = act(batch_norm(input)) with the running statistics updated (guarded as
        :func:`bnlab.statistics.update_running_stats`), or None."""


class EagerRunner(Protocol):
    """Optional, beside ``eager_batch_norm``, as a backend's ``eager_runner``: that function for
    every call with this one's signature (input shape, strides, dtype and device, mode, eps,
    activation: a caller keys the answer so, see :func:`bnlab.functional.call_signature`),
    specialized, as ``run(input, weight, bias, running, strict)``; or None where
    ``eager_batch_norm`` returns None for such calls."""

    def __call__(
        self,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running: RunningStatistics,
        training: bool,
        eps: float,
        activation: str = "identity",
        param: float = 0.0,
    ) -> Optional[Callable[..., Optional[Tensor]]]: ...


class ResidualUnitBackward(Protocol):
    """Optional, as a backend's ``batch_norm_add_act_backward_from_input``: the gradients of the
    residual unit y = act(batch_norm(x) + residual) (``batch_norm_act_forward`` with a residual)
    in one go, from x and y, as (dx, dweight, dbias, dresidual), dresidual = dz = dy act'(y) (act
    identity, relu or leaky_relu: y > 0 exactly where its input is); or None for a call it leaves
    to the two steps (dz by PyTorch, then ``batch_norm_act_backward`` of dz). The in-place mode's
    ``batch_norm_add_act_backward(grad_out, y, residual, weight, bias, mean, var, training, eps,
    activation, param)`` returns the same four from y and the residual."""

    def __call__(
        self,
        grad_out: Tensor,
        y: Tensor,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        var: Tensor,
        training: bool,
        eps: float,
        activation: str,
        param: float,
        output_mask: Sequence[bool],
    ) -> Optional[tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Tensor]]: ...


def plain_from_fused(
    act_forward: Callable, act_backward: Callable, batch_statistics: Callable
) -> tuple[Callable, Callable]:
    """``batch_norm_forward`` and ``batch_norm_backward`` of a backend whose kernels are the fused
    ones (activation ``identity``), which take every argument positionally; masks are not
    supported (``supports`` refuses them)."""

    def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps, mask=None):
        return act_forward(
            x, weight, bias, running_mean, running_var, training, eps, "identity", 0.0, None
        )

    def batch_norm_backward(
        grad_out, x, weight, mean, var, training, eps, output_mask=(True, True, True), mask=None
    ):
        if mean is None:  # recompute the statistics from x
            mean, var = batch_statistics(x)
        # the bias does not change dx, dweight or dbias without an activation
        return act_backward(
            grad_out, x, weight, None, mean, var, training, eps, "identity", 0.0, output_mask, False
        )

    batch_norm_forward.__doc__ = Kernels.batch_norm_forward.__doc__
    batch_norm_backward.__doc__ = Kernels.batch_norm_backward.__doc__
    return batch_norm_forward, batch_norm_backward
