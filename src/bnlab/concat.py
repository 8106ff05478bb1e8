"""Batch norm of concatenated features, the concatenation kept once: DenseNet's layers.

Each layer of a dense block (Huang et al. 2017, section 3) normalizes ``torch.cat(features, 1)``,
the block's input and every earlier layer's output. Written so, each layer copies all of them into
a new tensor, reads it once for the statistics and again to normalize, and the copy is kept for
the backward: the copies grow quadratically with the block's depth. Memory-efficient DenseNets
(Pleiss et al. 2017, section 3) keep the concatenation in one storage shared by the block's layers
instead; here:

- :class:`FeatureBuffer`: the features' values in one (N, C_buf, *spatial) tensor, filled in as
  layers add features (a new feature is copied in once) and grown by doubling, never written
  over where a layer has read: the layers' backwards keep the buffer, not a copy each;
- per-channel batch statistics kept with the buffer: a channel's mean and variance depend on its
  values alone, so each layer computes them only for the features new to it (one read of those),
  and the normalizing pass reads the rest from the buffer;
- :func:`batch_norm_concat_act`: ``act(batch_norm(torch.cat(chunks, 1)))`` in one normalizing
  pass (bnlab's CPU kernels), its backward two passes, the input's gradient split into the chunks'
  (:meth:`bnlab.nn.BatchNorm.concat` for a layer).

A buffer is found again from its first chunk (the block's input) and used only while each chunk it
holds is the same tensor, unchanged since it was copied (its version counter); anything else
starts a new buffer. Values are those of ``torch.cat``'s copy: a chunk changed in place after the
forward does not change the backward.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import functional as F
from . import kernels, ops
from .checks import check_batch_norm_args
from .kernels.composite import dense_format, is_channels_last, values_per_channel
from .statistics import RunningStatistics

__all__ = ["FeatureBuffer", "batch_norm_concat_act", "features_of"]


class FeatureBuffer:
    """The concatenation of chunks (N, C_i, *spatial) along dim 1, in ``data`` (N, C_buf, ...),
    ``channels`` of it filled; ``mean`` / ``var``: float64 batch statistics of its first
    ``known`` channels."""

    def __init__(self, like: Tensor, capacity: int) -> None:
        shape = (like.shape[0], capacity, *like.shape[2:])
        layout = dense_format(like)
        self.data = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)
        self.channels = 0
        self._chunks: list[tuple[weakref.ref, int]] = []  # (the chunk, its version when copied)
        self.mean = np.empty(0)
        self.var = np.empty(0)

    @property
    def known(self) -> int:
        return self.mean.shape[0]

    def holds(self, chunks: Sequence[Tensor]) -> int:
        """How many leading ``chunks`` this buffer holds as they are now."""
        held = 0
        for (ref, version), chunk in zip(self._chunks, chunks):
            if ref() is not chunk or chunk._version != version:
                break
            held += 1
        return held

    def append(self, chunk: Tensor) -> None:
        width = chunk.shape[1]
        with torch.no_grad():
            self.data[:, self.channels : self.channels + width].copy_(chunk)
        self.channels += width
        self._chunks.append((weakref.ref(chunk), chunk._version))

    def take_over(self, old: FeatureBuffer) -> None:
        """Start as a copy of ``old`` (a smaller buffer): its values, chunks and statistics."""
        with torch.no_grad():
            self.data[:, : old.channels].copy_(old.data[:, : old.channels])
        self.channels, self._chunks = old.channels, list(old._chunks)
        self.mean, self.var = old.mean, old.var

    def statistics(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch mean and variance of the first ``channels`` channels: those not known yet read."""
        if channels > self.known:
            mean, var = _cpu().concat_statistics(self.data, self.known, channels - self.known)
            self.mean = np.concatenate((self.mean, mean))
            self.var = np.concatenate((self.var, var))
        return self.mean[:channels], self.var[:channels]


_BUFFERS = WeakIdKeyDictionary()  # a block's first chunk -> the buffer that holds it
# the most channels a buffer started by a first chunk of this (shape, dtype, device) came to hold:
# the size to allocate the next time (a block's next step), so that the buffer is allocated once
# a step, at its final size (a buffer is never copied but to grow; glibc maps blocks over 32 MB
# fresh each time, and touching fresh pages costs a fault per page)
_FINAL_CHANNELS: dict[tuple, int] = {}
_FINAL_KEPT = 64


def features_of(chunks: Sequence[Tensor]) -> FeatureBuffer:
    """The buffer holding ``chunks`` in order (of one batch, spatial shape, dtype and device),
    found from the first chunk and extended with the chunks new to it. A new one, with twice the
    channels needed (a block's next layers fit), when a chunk it holds changed or another stands
    in its place (those channels may be read by a backward: never written over), or when the new
    chunks do not fit (the values it holds copied over; the old one stays with the backwards
    that keep it)."""
    first = chunks[0]
    buffer = _BUFFERS.get(first)
    held = 0 if buffer is None else buffer.holds(chunks)
    if buffer is not None and held < min(len(chunks), len(buffer._chunks)):
        buffer, held = None, 0
    needed = sum(c.shape[1] for c in chunks)
    key = (first.shape, first.dtype, first.device)
    if buffer is None or needed > buffer.data.shape[1]:
        final = _FINAL_CHANNELS.get(key, 0)
        old, buffer = buffer, FeatureBuffer(first, needed if needed > final else final)
        if old is not None:
            buffer.take_over(old)
        _BUFFERS[first] = buffer
    for chunk in chunks[held:]:
        buffer.append(chunk)
    if needed > _FINAL_CHANNELS.get(key, 0):
        if len(_FINAL_CHANNELS) >= _FINAL_KEPT:
            del _FINAL_CHANNELS[next(iter(_FINAL_CHANNELS))]
        _FINAL_CHANNELS[key] = needed
    return buffer


class _ConcatBatchNormAct(torch.autograd.Function):
    """act(batch_norm(cat(chunks, 1))) with x read from a :class:`FeatureBuffer`; kept for the
    backward: the buffer (shared by the block's layers) and the statistics."""

    @staticmethod
    def forward(ctx, weight, bias, config, running_mean, running_var, *chunks):
        training, eps, activation, param = config
        buffer = features_of(chunks)
        widths = [c.shape[1] for c in chunks]
        channels = sum(widths)
        if training:
            mean, var = buffer.statistics(channels)
        else:
            mean = running_mean.detach().to(torch.float64).numpy()
            var = running_var.detach().to(torch.float64).numpy()
        y = _cpu().batch_norm_concat_forward(
            buffer.data, channels, mean, var, weight, bias, eps, activation, param
        )
        ctx.buffer, ctx.channels, ctx.config = buffer.data, channels, config
        ctx.stats, ctx.widths = (mean, var), widths
        ctx.save_for_backward(weight, bias)
        out_mean = torch.from_numpy(mean).to(y.dtype) if training else y.new_empty(0)
        out_var = torch.from_numpy(var).to(y.dtype) if training else y.new_empty(0)
        ctx.mark_non_differentiable(out_mean, out_var)
        return y, out_mean, out_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        weight, bias = ctx.saved_tensors
        training, eps, activation, param = ctx.config
        wanted = [any(ctx.needs_input_grad[5:]), *ctx.needs_input_grad[:2]]
        dx, dweight, dbias = _cpu().batch_norm_concat_backward(
            grad_out, ctx.buffer, ctx.channels, weight, bias, *ctx.stats, training, eps,
            activation, param, wanted,
        )  # fmt: skip
        if weight is not None and dweight is not None:
            dweight = dweight.to(weight.dtype)
        if bias is not None and dbias is not None:
            dbias = dbias.to(bias.dtype)
        pieces = [None] * len(ctx.widths) if dx is None else dx.split(ctx.widths, dim=1)
        grads = [g if needed else None for g, needed in zip(pieces, ctx.needs_input_grad[5:])]
        return dweight, dbias, None, None, None, *grads


def batch_norm_concat_act(
    chunks: Sequence[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
    momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: str = "relu",
    activation_param: Optional[float] = None, *, num_batches_tracked: Optional[Tensor] = None,
    strict: bool = False, backend: Optional[str] = None,
) -> Tensor:  # fmt: skip
    r""":func:`bnlab.functional.batch_norm_act` of ``torch.cat(chunks, 1)`` without the
    concatenation each call: a dense block's layer (Huang et al. 2017) normalizing the block's
    input and every earlier layer's features.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \gamma + \beta
        \right), \quad x = [x_1, \ldots, x_k] \text{ along the channels}

    The chunks are kept in one :class:`FeatureBuffer` that the block's layers share and fill as
    features are added (Pleiss et al. 2017, section 3): a layer copies in only the features new
    to it, computes batch statistics for those alone (a channel's depend on its own values), and
    one pass reads the buffer and writes y; its backward keeps the shared buffer, not a
    concatenation of its own. Where bnlab's CPU kernels do not take the chunks (see
    :func:`takes`) or a torch.func transform or compilation is under way, this is
    ``batch_norm_act(torch.cat(chunks, 1), ...)`` (a single chunk is not copied). Results are
    that call's, to rounding. Other arguments as :func:`bnlab.functional.batch_norm_act` (no
    in-place mode)."""
    _check_chunks(chunks)
    activation, param = F.check_activation(activation, activation_param, False)
    if ops.transforms_active() or ops.traced() or not takes(chunks, activation, backend, training):
        input = chunks[0] if len(chunks) == 1 else torch.cat(list(chunks), 1)
        return F.batch_norm_act(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
            param, num_batches_tracked=num_batches_tracked, strict=strict, backend=backend,
        )  # fmt: skip
    running = RunningStatistics(running_mean, running_var, num_batches_tracked, momentum)
    stand_in = joined_shape(chunks)
    check_batch_norm_args(stand_in, weight, bias, running, training, eps)
    config = (training, eps, activation, param)
    out, mean, var = _ConcatBatchNormAct.apply(
        weight, bias, config, running_mean, running_var, *chunks
    )
    if training:
        running.record(mean, var, values_per_channel(stand_in), strict)
    return out


def joined_shape(chunks: Sequence[Tensor]) -> Tensor:
    """A stand-in of ``torch.cat(chunks, 1)``'s shape, dtype and device (one value, expanded),
    for the checks that read only those."""
    first = chunks[0]
    shape = (first.shape[0], sum(c.shape[1] for c in chunks), *first.shape[2:])
    return first.new_empty(1).expand(shape)


def _check_chunks(chunks) -> None:
    if not isinstance(chunks, (list, tuple)) or not chunks:
        raise TypeError(
            f"batch_norm_concat_act expects a non-empty list or tuple of tensors, got {chunks!r}"
        )
    if not all(isinstance(c, Tensor) for c in chunks):
        kinds = ", ".join(type(c).__name__ for c in chunks)
        raise TypeError(f"batch_norm_concat_act expects tensors, got ({kinds})")


_ACTIVATIONS = ("identity", "relu", "leaky_relu")
_DTYPES = (torch.float32, torch.float64)
_BACKEND = "cpu"  # bnlab's Numba kernels: the only ones that read a buffer's channels


def _cpu():
    return kernels.get_backend(_BACKEND).module


def takes(
    chunks: Sequence[Tensor], activation: str, backend: Optional[str], training: bool = True
) -> bool:
    """Whether the buffer's kernels run these chunks: two or more CPU float32 / float64 tensors
    of rank >= 3, all contiguous or all channels_last (the first chunk's layout; rank 4 or 5), of
    one dtype, batch and spatial shape (with spatial size > 1), under a piecewise-linear activation
    (identity, relu, leaky_relu), with bnlab's CPU kernels installed and no other backend asked for
    (``backend``, then $BNLAB_BACKEND), and as many values as the buffer pays for (see
    :func:`large_enough`)."""
    if activation not in _ACTIVATIONS or not worth_buffering(chunks, training):
        return False
    if kernels.requested_backend(backend) not in ("auto", _BACKEND):
        return False
    if _BACKEND not in kernels.available_backends():
        return False
    first = chunks[0]
    dtype, shape = first.dtype, first.shape
    n, spatial = shape[0], shape[2:]
    layout = dense_format(first)
    for c in chunks:  # one device: CPU tensors of a CPU dtype (a loop: a generator costs more)
        size = c.shape
        if c.dtype != dtype or size[0] != n or size[2:] != spatial or not size[1]:
            return False
        if c.device.type != "cpu" or not c.is_contiguous(memory_format=layout):
            return False
    return True


# A dense layer through the buffer against torch.cat then bnlab's batch norm + ReLU (the path
# otherwise taken), forward and backward (train) or forward (eval), that time / the buffer's, 2
# threads, one-off timing (concatenations of a first chunk and 32-channel ones):
#   16x224x16x16 (0.9M): NCHW train 2.2x, eval 1.5x; channels_last train 0.89x, eval 0.65x
#   16x480x8x8 (0.5M): NCHW 1.16x / 0.90x; channels_last 0.85x / 0.80x
#   16x992x4x4 (0.25M), 16x992x2x2: 0.28-0.73x in all four cells (rows of 4-16 values)
#   8x992x7x7 (0.4M): NCHW 1.03x / 0.69x; channels_last 0.79x / 0.71x
#   32x480x8x8 (1.0M): NCHW 1.68x / 1.05x; channels_last 1.14x / 0.97x
#   8x992x14x14 (1.6M): 1.17-1.36x in all four; 8x480x28x28 (3M), 8x224x56x56 (5.6M): 1.2-2.7x
# densenet121 at 16x3x64x64 with every layer through the buffer trained at 0.90x and evaluated at
# 0.82x torch.nn's speed (benchmarks/model_speed.py, one run): small layers stay on torch.cat.
# Whole channels_last training steps lost where the layer alone gained: densenet121 at 8x3x224x224
# (concatenations of 1.6M-6.4M values through the buffer), convert with fused activations, 8 fresh
# processes each, median paired ratio to torch.nn with ATen's BN + ReLU on wide rows (see
# bnlab.kernels.cpu.prefers): 0.960x with the buffer, 0.992x without; so channels_last training
# stays on torch.cat at every size.
_TRAIN_NCHW_FROM = 1 << 19
_TRAIN_CHANNELS_LAST_FROM = 1 << 62  # never (above); a test may lower it to run that path
_OTHERWISE_FROM = 1 << 20


def large_enough(numel: int, contiguous: bool, training: bool) -> bool:
    """Whether a concatenation of ``numel`` values gains from the buffer (measured above): from
    512K values in an NCHW training step, never in a channels_last one, from 1M in eval."""
    if training:
        return numel >= (_TRAIN_NCHW_FROM if contiguous else _TRAIN_CHANNELS_LAST_FROM)
    return numel >= _OTHERWISE_FROM


def worth_buffering(chunks: Sequence[Tensor], training: bool) -> bool:
    """The first, cheap part of :func:`takes`, asked first at each call of a small layer: two or
    more chunks, the first a CPU float32 / float64 tensor of rank >= 3 (spatial size > 1),
    contiguous or channels_last, and the concatenation large enough (:func:`large_enough`)."""
    if len(chunks) < 2:
        return False
    first = chunks[0]
    shape = first.shape
    if len(shape) < 3 or first.dtype not in _DTYPES or first.device.type != "cpu":
        return False
    contiguous = first.is_contiguous()
    if not (contiguous or (len(shape) in (4, 5) and is_channels_last(first))):
        return False
    if math.prod(shape[2:]) <= 1 or not shape[1]:
        return False
    width = sum([c.shape[1] for c in chunks])
    return large_enough(width * (first.numel() // shape[1]), contiguous, training)
