"""The custom ops ``bnlab::batch_norm``, ``bnlab::layer_norm``, their backwards and autograd.

Each op is a ``torch.library`` custom op with a fake (meta) kernel and a registered backward that
is itself a custom op (``bnlab::batch_norm_backward``, ``bnlab::layer_norm_backward``), so
autograd, ``torch.compile(fullgraph=True)`` and ``torch.export`` each see one op per direction. In
eager mode the same forward and backward run through a ``torch.autograd.Function`` instead (the
custom-op wrapper costs ~0.3 ms a call on a 51 MB input, measured: 10% of a memory-bound batch
norm). Batch norm with a fused activation (and the in-place activated mode) is an autograd Function.

The kernels come from the backend the caller selected (:func:`bnlab.kernels.select_backend`), passed
in by name; only the backward of a plain training batch norm selects again, once, for its own op
(its fastest backend may not be the forward's).

Second derivatives (gradient penalties, ``gradgradcheck``): when the backward itself is being
differentiated, it runs the composite backward of :mod:`bnlab.kernels.composite` in
autograd-visible PyTorch ops, with the batch statistics recomputed from the input so that their
dependence on it is kept.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import composite, get_backend, select_backend
from .kernels.composite import accumulation_dtype
from .statistics import RunningStatistics

__all__ = [
    "batch_norm_op_name",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_add_act",
    "layer_norm",
    "transforms_active",
    "transformed_batch_norm",
]


def batch_norm_op_name(mask: Optional[Tensor], training: bool) -> str:
    """The registry's name for what a backend must support: masked statistics are an extra, and
    eval (no statistics: one streaming pass) is told apart so the fastest backend can take it."""
    if not training:
        return "batch_norm_eval"
    return "batch_norm_masked" if mask is not None else "batch_norm"


# --------------------------------------------------------------------------------------------
# bnlab::batch_norm
# --------------------------------------------------------------------------------------------


def _batch_norm_kernel(
    input, weight, bias, running_mean, running_var, mask, training, eps, backend, requested
):
    kernels = get_backend(backend).module
    return kernels.batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, eps, mask
    )


@torch.library.custom_op("bnlab::batch_norm", mutates_args=())
def _batch_norm_op(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mask: Optional[Tensor],
    training: bool,
    eps: float,
    backend: str,
    requested: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_kernel(
        input, weight, bias, running_mean, running_var, mask, training, eps, backend, requested
    )


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, mask, training, eps, backend, requested):
    return _fake_outputs(input, (input.shape[1] if training else 0,))


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    mask: Optional[Tensor],
    training: bool,
    eps: float,
    output_mask: list[bool],
    backend: str,
    requested: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_backward_kernel(
        grad_out, input, weight, mean, var, mask, training, eps, output_mask, backend, requested
    )


def _batch_norm_backward_kernel(
    grad_out, input, weight, mean, var, mask, training, eps, output_mask, backend, requested
):
    if batch_norm_op_name(mask, training) == "batch_norm":  # a plain training backward
        kernels = select_backend("batch_norm_backward", input, requested).module
    else:
        kernels = get_backend(backend).module
    grads = kernels.batch_norm_backward(
        grad_out, input, weight, mean, var, training, eps, output_mask, mask
    )
    return _absent_as_empty(grads, input)


@_batch_norm_backward_op.register_fake
def _(grad_out, input, weight, mean, var, mask, training, eps, output_mask, backend, requested):
    return _fake_grads(input, (input.shape[1],), weight, output_mask)


def _absent_as_empty(grads, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    empty = input.new_empty((0,), dtype=accumulation_dtype(input.dtype))
    return tuple(empty.clone() if g is None else g for g in grads)


def _fake_outputs(input: Tensor, stat_shape) -> tuple[Tensor, Tensor, Tensor]:
    """A forward's (y, mean, var), unfilled: y like the input, the statistics shaped ``stat_shape``
    in the accumulation dtype."""
    stats = input.new_empty(stat_shape, dtype=accumulation_dtype(input.dtype))
    return torch.empty_like(input), stats, torch.empty_like(stats)


def _fake_grads(input: Tensor, param_shape, weight, output_mask):
    acc = accumulation_dtype(input.dtype)
    dx = torch.empty_like(input) if output_mask[0] else input.new_empty((0,), dtype=acc)
    dw_shape = param_shape if weight is not None and output_mask[1] else (0,)
    db_shape = param_shape if output_mask[2] else (0,)
    return dx, input.new_empty(dw_shape, dtype=acc), input.new_empty(db_shape, dtype=acc)


def _param_dtypes(weight, bias):
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _setup_batch_norm(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, mask, training, eps, backend, requested = inputs
    _, mean, var = output
    if not training:  # eval: the running statistics are the (constant) statistics
        mean, var = running_mean, running_var
    ctx.save_for_backward(input, weight, mean, var, mask)
    ctx.training, ctx.eps, ctx.backend, ctx.requested = training, eps, backend, requested
    ctx.param_dtypes = _param_dtypes(weight, bias)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_batch_norm(
    ctx, grad_out, _grad_mean, _grad_var, backward_kernel=_batch_norm_backward_op
):
    input, weight, mean, var, mask = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:3])
    if _differentiating_backward(grad_out, input, weight):
        grads = composite.batch_norm_backward(
            grad_out,
            input,
            weight,
            None if ctx.training else mean,
            None if ctx.training else var,
            ctx.training,
            ctx.eps,
            wanted,
            mask,
        )
    else:
        grads = backward_kernel(
            grad_out,
            input,
            weight,
            mean,
            var,
            mask,
            ctx.training,
            ctx.eps,
            wanted,
            ctx.backend,
            ctx.requested,
        )
    return (*_cast_grads(grads, wanted, ctx.param_dtypes), *([None] * 7))


def _differentiating_backward(*tensors) -> bool:
    """True while autograd records the backward itself (create_graph=True: double backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cast_grads(grads, output_mask, param_dtypes):
    dx, dw, db = (g if wanted else None for g, wanted in zip(grads, output_mask))
    dw = None if dw is None else dw.to(param_dtypes[0])
    db = None if db is None else db.to(param_dtypes[1])
    return dx, dw, db


_batch_norm_op.register_autograd(_backward_batch_norm, setup_context=_setup_batch_norm)


class _EagerBatchNorm(torch.autograd.Function):
    """The same op for eager mode, without the custom-op layer. Under torch.compile /
    torch.export the custom op runs instead (one node, fake kernels)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _batch_norm_kernel(*inputs)
        _setup_batch_norm(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        return _backward_batch_norm(
            ctx, grad_out, grad_mean, grad_var, backward_kernel=_batch_norm_backward_kernel
        )


def batch_norm(
    input, weight, bias, running: RunningStatistics, mask, training, eps, backend, requested
):
    """(y, mean, var) by the ``backend``'s kernels, differentiable: the custom op when compiling
    or exporting, the eager Function otherwise. ``running``: its buffers normalize in eval (they are
    not updated here). ``requested``: what the caller asked for, from which a plain training
    backward selects its own backend."""
    inputs = (input, weight, bias, running.mean, running.var, mask, training, eps)
    inputs += (backend, requested)
    if torch.compiler.is_compiling():
        return _batch_norm_op(*inputs)
    return _EagerBatchNorm.apply(*inputs)


# --------------------------------------------------------------------------------------------
# batch norm + activation (fused), and the in-place activated mode
# --------------------------------------------------------------------------------------------


def _inplace_gamma(weight: Optional[Tensor], eps: float) -> Optional[Tensor]:
    """|weight| + eps: recovering x from y divides by gamma, kept away from zero (Rota Bulo et al.
    2018, section 3.2)."""
    return None if weight is None else weight.abs() + eps


def _weight_grad(dgamma: Optional[Tensor], weight: Optional[Tensor], inplace: bool):
    """dweight from dgamma: in place gamma = |weight| + eps, so times sign(weight)."""
    if not inplace or dgamma is None:
        return dgamma
    return dgamma * torch.sign(weight).to(dgamma.dtype)


def _fused_forward(ctx, input, weight, bias, running, config, residual=None):
    """The forward of the fused Functions: ``config`` = (training, eps, activation, param,
    inplace, backend), kept on ``ctx``; the residual, when given, added before the activation.
    Returns (y, mean, var, gamma, statistics to keep: the batch's, or the running ones cloned)."""
    training, eps, activation, param, inplace, backend = config
    gamma = _inplace_gamma(weight, eps) if inplace else weight
    extra = {} if residual is None else {"residual": residual}  # a user's backend may lack it
    y, mean, var = get_backend(backend).module.batch_norm_act_forward(
        input,
        gamma,
        bias,
        running.mean,
        running.var,
        training,
        eps,
        activation,
        param,
        out=input if inplace else None,
        **extra,
    )
    if inplace:
        ctx.mark_dirty(input)
    ctx.mark_non_differentiable(mean, var)
    ctx.config = config
    stats = (mean, var) if training else (running.mean.clone(), running.var.clone())
    return y, mean, var, gamma, stats


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x)) with one hand-derived backward; in place, only the output is kept."""

    @staticmethod
    def forward(
        ctx, input, weight, bias, running, training, eps, activation, param, inplace, backend
    ):
        config = (training, eps, activation, param, inplace, backend)
        y, mean, var, gamma, stats = _fused_forward(ctx, input, weight, bias, running, config)
        ctx.save_for_backward(y if inplace else input, weight, gamma, bias, *stats)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        saved, weight, gamma, bias, mean, var = ctx.saved_tensors
        training, eps, activation, param, inplace, backend = ctx.config
        wanted = list(ctx.needs_input_grad[:3])
        dx, dgamma, dbias = get_backend(backend).module.batch_norm_act_backward(
            grad_out,
            saved,
            gamma,
            bias,
            mean,
            var,
            training,
            eps,
            activation,
            param,
            wanted,
            from_output=inplace,
        )
        dweight = _weight_grad(dgamma, weight, inplace)
        dx, dweight, dbias = _cast_grads((dx, dweight, dbias), wanted, _param_dtypes(weight, bias))
        return dx, dweight, dbias, *([None] * 7)


batch_norm_act = _BatchNormAct.apply
"""``batch_norm_act(input, weight, bias, running, training, eps, activation, param, inplace,
backend)``: (y, mean, var) of act(batch_norm(x)) by the ``backend``'s fused kernels,
differentiable; ``running``: its buffers normalize in eval (they are not updated here)."""


class _BatchNormAddAct(torch.autograd.Function):
    """act(batch_norm(x) + residual) for the piecewise-linear activations (identity, relu,
    leaky_relu with a slope > 0): the end of a residual unit (He et al. 2016, eq. 1) in one
    normalizing pass. Kept for the backward: x and y; in place, y (written over x) and the
    residual, from which the normalized input is recovered."""

    @staticmethod
    def forward(
        ctx, input, residual, weight, bias, running, training, eps, activation, param, inplace,
        backend,
    ):  # fmt: skip
        config = (training, eps, activation, param, inplace, backend)
        y, mean, var, gamma, stats = _fused_forward(
            ctx, input, weight, bias, running, config, residual
        )
        kept = (y, residual) if inplace else (y, input)
        ctx.save_for_backward(*kept, weight, gamma, bias, *stats)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, other, weight, gamma, bias, mean, var = ctx.saved_tensors
        training, eps, activation, param, inplace, backend = ctx.config
        kernels = get_backend(backend).module
        wanted = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]]
        args = (gamma, bias, mean, var, training, eps, activation, param)
        if inplace:  # the backend's two passes over (y, residual, dy)
            from_output = getattr(kernels, "batch_norm_add_act_backward", None)
            grads = None if from_output is None else from_output(grad_out, y, other, *args)
        else:  # the backend's kernel over (x, y, dy), where it takes them
            from_input = getattr(kernels, "batch_norm_add_act_backward_from_input", None)
            grads = None if from_input is None else from_input(grad_out, y, other, *args, wanted)
        if grads is not None:
            dx, dgamma, dbias, dz = grads
        else:
            # y > 0 exactly where z = batch_norm(x) + residual > 0 (slopes > 0): dz from y
            dz = composite.activation_grad(grad_out, y, activation, param)
            saved = other  # x; in place: the batch norm's output, act^-1(y) - residual
            if inplace:
                saved = composite.invert_activation(y, activation, param) - other
            dx, dgamma, dbias = kernels.batch_norm_act_backward(
                dz, saved, gamma, bias, mean, var, training, eps, "identity", 0.0, wanted, inplace
            )
        dweight = _weight_grad(dgamma, weight, inplace)
        dx, dweight, dbias = _cast_grads((dx, dweight, dbias), wanted, _param_dtypes(weight, bias))
        dresidual = dz if ctx.needs_input_grad[1] else None
        return dx, dresidual, dweight, dbias, *([None] * 7)


batch_norm_add_act = _BatchNormAddAct.apply
"""``batch_norm_add_act(input, residual, weight, bias, running, training, eps, activation, param,
inplace, backend)``: (y, mean, var) of act(batch_norm(x) + residual), differentiable (see
:class:`_BatchNormAddAct`); ``running`` as :func:`batch_norm_act`'s."""


# --------------------------------------------------------------------------------------------
# bnlab::layer_norm
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("bnlab::layer_norm", mutates_args=())
def _layer_norm_op(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = get_backend(backend).module
    return kernels.layer_norm_forward(input, normalized_shape, weight, bias, eps)


@_layer_norm_op.register_fake
def _(input, normalized_shape, weight, bias, eps, backend):
    k = len(normalized_shape)
    return _fake_outputs(input, (*input.shape[: input.dim() - k], *([1] * k)))


@torch.library.custom_op("bnlab::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    grad_out: Tensor,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    kernels = get_backend(backend).module
    grads = kernels.layer_norm_backward(
        grad_out, input, normalized_shape, weight, mean, var, eps, output_mask
    )
    return _absent_as_empty(grads, input)


@_layer_norm_backward_op.register_fake
def _(grad_out, input, normalized_shape, weight, mean, var, eps, output_mask, backend):
    return _fake_grads(input, tuple(normalized_shape), weight, output_mask)


def _setup_layer_norm(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps, backend = inputs
    _, mean, var = output
    ctx.save_for_backward(input, weight, mean, var)
    ctx.normalized_shape, ctx.eps, ctx.backend = list(normalized_shape), eps, backend
    ctx.param_dtypes = _param_dtypes(weight, bias)
    ctx.mark_non_differentiable(mean, var)


def _backward_layer_norm(ctx, grad_out, _grad_mean, _grad_var):
    input, weight, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[2], needs[3]]
    if _differentiating_backward(grad_out, input, weight):
        grads = composite.layer_norm_backward(
            grad_out, input, ctx.normalized_shape, weight, None, None, ctx.eps, wanted
        )
    else:
        grads = _layer_norm_backward_op(
            grad_out, input, ctx.normalized_shape, weight, mean, var, ctx.eps, wanted, ctx.backend
        )
    dx, dw, db = _cast_grads(grads, wanted, ctx.param_dtypes)
    return dx, None, dw, db, None, None


_layer_norm_op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)


def layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight, bias, eps: float, backend: str
) -> Tensor:
    """y of the layer norm by the ``backend``'s kernels, differentiable (one custom op)."""
    return _layer_norm_op(input, list(normalized_shape), weight, bias, eps, backend)[0]


# --------------------------------------------------------------------------------------------
# torch.func transforms
# --------------------------------------------------------------------------------------------


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, jvp, ...) is tracing this call.

    bnlab's ops have no batching rules and its kernels read data pointers, so under a transform
    the public ops run as torch.nn.functional's, which functorch knows: they then work exactly
    where torch.nn's do, and fail where torch.nn's fail, with torch's message.
    """
    if torch.compiler.is_compiling():  # dynamo traces bnlab's ops themselves
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def traced() -> bool:
    """Whether this call is being compiled (dynamo) or traced by a torch.func transform: either
    way no eager kernel may run it."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def transformed_batch_norm(
    input, weight, bias, running: RunningStatistics, training, eps, activation="identity", param=0.0
) -> Tensor:
    """Batch norm (then the activation) as torch.nn.BatchNorm computes it, for a call under a
    torch.func transform: ``num_batches_tracked`` counted and the cumulative factor taken as the
    module does, the running statistics updated by ATen's op. bnlab's non-finite guard and
    :class:`bnlab.accumulate` do not apply inside a transform."""
    factor = running.momentum
    if training and running.mean is not None and running.num_batches_tracked is not None:
        running.num_batches_tracked.add_(1)
        if factor is None:
            factor = 1.0 / float(running.num_batches_tracked)
    y = torch.nn.functional.batch_norm(
        input, running.mean, running.var, weight, bias, training, factor or 0.0, eps
    )
    return composite.activate(y, activation, param)
