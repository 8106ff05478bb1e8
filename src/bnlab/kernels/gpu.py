"""Triton backend for CUDA: batch norm (+ activation, in-place mode) at the memory-bandwidth limit.

Every input is seen as an (N, C, S) array with strides (sn, sc, ss), without copying:

- contiguous inputs of rank >= 3: (N, C, prod(spatial)), ss = 1 (each (n, c) row is contiguous);
- (N, C) inputs and channels_last / channels_last_3d ones: (1, C, N * prod(spatial)), sc = 1 (one
  row of every channel after another).

Kernels walk tiles of (BLOCK_C channels) x (BLOCK_S positions); the tile's fast axis is the one with
stride 1, so loads coalesce in both layouts. Work is split over channel blocks *and* over the N * S
positions: a 3-channel 512x512 batch still fills every SM.

Passes over memory (m = values per channel):

- training forward: a statistics pass (read x), a normalize pass (read x, write y);
- backward: a sums pass (read x or y, and dy), an input-gradient pass (read them again, write dx);
- eval forward: one read, one write.

Each statistics program reduces its share of the positions with one Welford summary (count, mean,
M2) per tile lane, updated elementwise; at its end the lanes are merged with Chan et al.'s parallel
formula, and a second small kernel merges the programs' partials per channel the same way. Nothing
is E[x^2] - E[x]^2, so float32 input at 1e4 + N(0, 1) keeps its variance. Partials go to a
(splits, C) buffer rather than atomics: results do not depend on scheduling.

float16/bfloat16 load and compute in float32 (statistics and parameter gradients come back in
float32); float64 computes in float64. The output is ``(x - mean) * a + b`` with a = weight *
invstd, never ``x * a + (b - mean * a)``. Fused activations (identity, relu, leaky_relu, elu, silu,
hardswish, hardsigmoid, gelu, gelu_tanh; :data:`ACTIVATION_CODES`) apply in the same pass; both
backward passes recompute the pre-activation z = (x - mean) * a + b from x (nothing else is kept),
or in the in-place mode invert the activation from the saved output y (identity, leaky_relu, elu).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before bnlab is
imported) on CPU tensors: that is how the test suite runs them everywhere. Automatic backend
selection only prefers this backend for CUDA tensors.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .composite import accumulation_dtype, activated, activated_backward, is_dense, laid_out_like
from .contract import UNMASKED_BATCH_NORM_OPS, plain_from_fused

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = UNMASKED_BATCH_NORM_OPS
ACTIVATION_CODES = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "elu": 3,
    "silu": 4,
    "hardswish": 5,
    "hardsigmoid": 6,
    "gelu": 7,
    "gelu_tanh": 8,
}
_TILE = 4096  # values per elementwise tile: 16 per thread at 8 warps
_REDUCE_TILE = 2048  # values per reduction tile: 8 per thread, x3 running summaries
_PROGRAMS_PER_SM = 4  # reduction programs per SM: enough to hide latency, few partials to merge
_MAX_GRID = 65535  # CUDA's limit on grid axes 1 and 2


def supports(op: str, x: Tensor) -> bool:
    """Plain and fused batch norm (no masked statistics) on CUDA tensors of a floating dtype; on
    CPU tensors only under Triton's interpreter. Contiguous inputs with spatial dims put N on a
    grid axis, which holds at most 65535."""
    on_device = x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")
    fits_grid = x.dim() == 2 or x.shape[0] <= _MAX_GRID or not x.is_contiguous()
    return op in _OPS and on_device and x.dtype in _DTYPES and x.numel() > 0 and fits_grid


def prefers(op: str, x: Tensor, activation: Optional[str] = None) -> bool:
    """Never, for now: these kernels have not run on a GPU in a measured sweep
    (benchmarks/bn_speed_gpu.py), so automatic selection leaves CUDA tensors to ``native``
    (cuDNN / ATen, what torch.nn runs) and they run when asked for by name (``backend="gpu"``).
    Once the sweep's numbers are committed, this becomes a rule by op and shape where they win,
    with the numbers beside it."""
    return False


# --------------------------------------------------------------------------------------------
# kernels. Triton takes flat arguments (pointers, sizes, strides, compile-time flags), so each
# kernel lists them by role, a line a group (``# fmt: skip``), rather than a name a line.
# --------------------------------------------------------------------------------------------


@triton.jit
def _relu6_over_6(z):
    """hardsigmoid(z) = min(max(z + 3, 0), 6) / 6; NaN kept (a comparison with NaN is False)."""
    t = z + 3.0
    t = tl.where(t < 0.0, 0.0, t)
    return tl.where(t > 6.0, 6.0, t) / 6.0


@triton.jit
def _tanh_gate(z):
    """(1 + tanh(u)) / 2 = sigmoid(2 u), u = sqrt(2 / pi) (z + 0.044715 z^3): gelu_tanh's factor,
    without the cancellation of 1 + tanh(u) for negative u (Triton has no tanh of its own).
    Constants are literals: a global would have to be a tl.constexpr, which the interpreter
    cannot multiply a tensor by."""
    return tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z))


@triton.jit
def _activate(z, param, ACT: tl.constexpr):
    """act(z), the definitions of :mod:`bnlab.kernels.contract`'s table."""
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * param)
    elif ACT == 3:
        z = tl.where(z > 0, z, param * (tl.exp(z) - 1.0))
    elif ACT == 4:
        z = z * tl.sigmoid(z)
    elif ACT == 5:
        z = z * _relu6_over_6(z)
    elif ACT == 6:
        z = _relu6_over_6(z)
    elif ACT == 7:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1 / sqrt(2)
    elif ACT == 8:
        z = z * _tanh_gate(z)
    return z


@triton.jit
def _activation_grad(dy, z, param, ACT: tl.constexpr):
    """dy * act'(z), with the branches at the kinks of :mod:`bnlab.kernels.contract`'s table."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(z > 0, dy, dy * param)
    elif ACT == 3:
        dy = tl.where(z > 0, dy, dy * param * tl.exp(z))
    elif ACT == 4:
        s = tl.sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 5:
        dy = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, dy * (z / 3.0 + 0.5), dy))
    elif ACT == 6:
        dy = tl.where((z > -3.0) & (z < 3.0), dy / 6.0, 0.0)
    elif ACT == 7:
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dy = dy * (0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * pdf)
    elif ACT == 8:
        # (1 + t) / 2 = s and (1 - t^2) / 2 = 2 s (1 - s), t = tanh(u), s = sigmoid(2 u)
        s = _tanh_gate(z)
        slope = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        dy = dy * (s + 2.0 * z * s * (1.0 - s) * slope)
    return dy


@triton.jit
def _deactivate(y, param, ACT: tl.constexpr):
    """z with act(z) = y (identity, leaky_relu, elu: the invertible ones)."""
    if ACT == 2:
        y = tl.where(y >= 0, y, y / param)
    elif ACT == 3:
        y = tl.where(y >= 0, y, tl.log(1.0 + y / param))
    return y


@triton.jit
def _channels(pid_c, C, BLOCK_C: tl.constexpr):
    """The channels of block pid_c, and which of them exist (the last block may pass C)."""
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return cs, cs < C


@triton.jit
def _tile(pid_c, t, tiles, C, S, sn, sc, ss, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and the in-bounds mask ``inside`` of position tile t of a channel block. Tiles are
    numbered over N * cdiv(S, BLOCK_S) = ``tiles``; a t past the last gives an empty tile."""
    s_tiles = tl.cdiv(S, BLOCK_S)
    n = t // s_tiles
    s0 = (t - n * s_tiles) * BLOCK_S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    offsets = (
        n.to(tl.int64) * sn + s0.to(tl.int64) * ss + (cs[:, None] * sc + (s[None, :] - s0) * ss)
    )  # (BLOCK_C, BLOCK_S)
    s_end = tl.where(t < tiles, S, 0)  # a bound, not a mask of its own: one comparison per value
    return offsets, (cs[:, None] < C) & (s[None, :] < s_end)


@triton.jit
def _program_tile(C, S, sn, sc, ss, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(channel block, offsets, inside) of an elementwise program's one tile: grid axis 0 walks
    the position tiles of a row, axis 1 the channel blocks, axis 2 the N rows."""
    pid_t, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = n * tl.cdiv(S, BLOCK_S) + pid_t
    offsets, inside = _tile(pid_c, t, t + 1, C, S, sn, sc, ss, BLOCK_C, BLOCK_S)
    return pid_c, offsets, inside


@triton.jit
def _run_tile(i, N, C, S, sn, sc, ss, per_program, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(offsets, inside) of tile i of a reduction program's run of ``per_program`` tiles: grid
    axis 0 is the channel block, axis 1 the run."""
    tiles = N * tl.cdiv(S, BLOCK_S)
    t = tl.program_id(1) * per_program + i
    return _tile(tl.program_id(0), t, tiles, C, S, sn, sc, ss, BLOCK_C, BLOCK_S)


@triton.jit
def _store_partial(ptr, values, C, BLOCK_C: tl.constexpr):
    """A reduction program's per-channel values into its row (grid axis 1) of a (splits, C)
    buffer, its channel block's columns (axis 0)."""
    cs, ok = _channels(tl.program_id(0), C, BLOCK_C)
    tl.store(ptr + tl.program_id(1) * C + cs, values, mask=ok)


@triton.jit
def _channel_params(
    pid_c,
    C,
    mean_ptr,
    var_ptr,
    w_ptr,
    b_ptr,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(mean, invstd, a = weight * invstd, b) of a channel block, as (BLOCK_C, 1) columns."""
    cs, ok = _channels(pid_c, C, BLOCK_C)
    mean = tl.load(mean_ptr + cs, mask=ok, other=0.0).to(ACC)
    var = tl.load(var_ptr + cs, mask=ok, other=1.0).to(ACC)
    invstd = 1.0 / tl.sqrt(var + eps)
    a = invstd
    if HAS_W:
        a = a * tl.load(w_ptr + cs, mask=ok, other=1.0).to(ACC)
    b = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        b = tl.load(b_ptr + cs, mask=ok, other=0.0).to(ACC)
    return mean[:, None], invstd[:, None], a[:, None], b[:, None]


@triton.jit
def _chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al.'s merge of two (mean, M2, count) summaries; an empty one changes nothing."""
    count = count_a + count_b
    weight = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * weight, m2_a + m2_b + delta * delta * count_a * weight, count


@triton.jit
def _stats_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,  # input; partial summaries out, (splits, C) each
    N, C, S, sn, sc, ss, tiles_per_program,  # the (N, C, S) view; a program's run of tiles
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Partial (count, mean, M2) per channel over this program's run of tiles -> its row.

    Every lane of the tile keeps its own Welford summary (elementwise work only inside the loop);
    the lanes are merged once at the end with Chan's formula for many groups:
    mean = sum(n_l mean_l) / n, M2 = sum(M2_l + n_l (mean_l - mean)^2)."""
    count = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    mean = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for i in range(tiles_per_program):
        offsets, inside = _run_tile(i, N, C, S, sn, sc, ss, tiles_per_program, BLOCK_C, BLOCK_S)
        v = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
        count += tl.where(inside, 1.0, 0.0)
        delta = tl.where(inside, v - mean, 0.0)
        mean += delta / tl.maximum(count, 1.0)
        m2 += delta * (v - mean)
    # Chan's merge of all lanes at once: the count-weighted mean, then M2 about it
    total = tl.sum(count, axis=1)
    merged_mean = tl.sum(count * mean, axis=1) / tl.maximum(total, 1.0)
    spread = mean - merged_mean[:, None]
    _store_partial(count_ptr, total, C, BLOCK_C)
    _store_partial(mean_ptr, merged_mean, C, BLOCK_C)
    _store_partial(m2_ptr, tl.sum(m2 + count * spread * spread, axis=1), C, BLOCK_C)


@triton.jit
def _merge_kernel(
    first_ptr, second_ptr, count_ptr,  # partials, (SPLITS, C) each
    out_first_ptr, out_second_ptr,  # merged, (C,) each
    C, SPLITS, CHAN: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The reduction programs' (SPLITS, C) partials merged per channel: two sums added (the
    backward's), or (CHAN) the (mean, M2, count) summaries merged by Chan's formula into the batch
    mean and biased variance M2 / count."""
    cs, ok = _channels(tl.program_id(0), C, BLOCK_C)
    first = tl.zeros([BLOCK_C], ACC)
    second = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], ACC)
    for i in range(SPLITS):
        part_first = tl.load(first_ptr + i * C + cs, mask=ok, other=0.0)
        part_second = tl.load(second_ptr + i * C + cs, mask=ok, other=0.0)
        if CHAN:
            part_count = tl.load(count_ptr + i * C + cs, mask=ok, other=0.0)
            first, second, count = _chan_merge(
                first, second, count, part_first, part_second, part_count
            )
        else:
            first += part_first
            second += part_second
    if CHAN:
        second = tl.maximum(second / tl.maximum(count, 1.0), 0.0)  # lanes past C: 0 / 1, not 0 / 0
    tl.store(out_first_ptr + cs, first, mask=ok)
    tl.store(out_second_ptr + cs, second, mask=ok)


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr,
    mean_ptr, var_ptr, w_ptr, b_ptr, eps, param,  # per channel (_channel_params); act's p
    C, S, sn, sc, ss,  # the (N, C, S) view
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """y = act((x - mean) * a + b) on one tile (y may be x: the in-place mode)."""
    pid_c, offsets, inside = _program_tile(C, S, sn, sc, ss, BLOCK_C, BLOCK_S)
    mean, _, a, b = _channel_params(
        pid_c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B, ACC, BLOCK_C
    )
    v = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(ACC)
    y = _activate((v - mean) * a + b, param, ACT)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _recover(v, dy, mean, a, b, param, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """(x - mean, dz = dy * act'(z)) from x, or from the output y in the in-place mode."""
    if FROM_OUTPUT:
        z = _deactivate(v, param, ACT)
        centred = (z - b) / a
    else:
        centred = v - mean
        z = centred * a + b
    return centred, _activation_grad(dy, z, param, ACT)


@triton.jit
def _grad_sums_kernel(
    v_ptr, dy_ptr, sum_dz_ptr, sum_dzx_ptr,  # x (or y), dy; partial sums out, (splits, C)
    mean_ptr, var_ptr, w_ptr, b_ptr, eps, param,  # per channel (_channel_params); act's p
    N, C, S, sn, sc, ss, tiles_per_program,  # the (N, C, S) view; a program's run of tiles
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Partial sum(dz) and sum(dz * (x - mean)) per channel over this program's tiles."""
    mean, invstd, a, b = _channel_params(
        tl.program_id(0), C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B, ACC, BLOCK_C
    )
    acc_dz = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    acc_dzx = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for i in range(tiles_per_program):
        offsets, inside = _run_tile(i, N, C, S, sn, sc, ss, tiles_per_program, BLOCK_C, BLOCK_S)
        v = tl.load(v_ptr + offsets, mask=inside, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(ACC)
        centred, dz = _recover(v, dy, mean, a, b, param, ACT, FROM_OUTPUT)
        dz = tl.where(inside, dz, 0.0)
        acc_dz += dz
        acc_dzx += dz * centred
    _store_partial(sum_dz_ptr, tl.sum(acc_dz, axis=1), C, BLOCK_C)
    _store_partial(sum_dzx_ptr, tl.sum(acc_dzx, axis=1), C, BLOCK_C)


@triton.jit
def _grad_input_kernel(
    v_ptr, dy_ptr, dx_ptr, sum_dz_ptr, sum_dzx_ptr,  # x (or y), dy; dx out; the merged sums
    mean_ptr, var_ptr, w_ptr, b_ptr, eps, param, values,  # per channel; act's p; m
    C, S, sn, sc, ss,  # the (N, C, S) view
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    TRAINING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """dx = a * dz - a * invstd^2 * (x - mean) * sum(dz (x - mean)) / m - a * sum(dz) / m on one
    tile (eval: dx = a * dz)."""
    pid_c, offsets, inside = _program_tile(C, S, sn, sc, ss, BLOCK_C, BLOCK_S)
    mean, invstd, a, b = _channel_params(
        pid_c, C, mean_ptr, var_ptr, w_ptr, b_ptr, eps, HAS_W, HAS_B, ACC, BLOCK_C
    )
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(ACC)
    centred, dz = _recover(v, dy, mean, a, b, param, ACT, FROM_OUTPUT)
    dx = a * dz
    if TRAINING:
        cs, ok = _channels(pid_c, C, BLOCK_C)
        sum_dz = tl.load(sum_dz_ptr + cs, mask=ok, other=0.0)[:, None]
        sum_dzx = tl.load(sum_dzx_ptr + cs, mask=ok, other=0.0)[:, None]
        dx -= a * (invstd * invstd * centred * sum_dzx + sum_dz) / values
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# layouts and launch geometry
# --------------------------------------------------------------------------------------------


def _dense_view(x: Tensor) -> Tensor:
    """x itself when the kernels can walk it as (N, C, S), else a contiguous copy."""
    return x if is_dense(x) else x.contiguous()


def _tile_shape(c: int, s: int, rows: bool, budget: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) of about ``budget`` values, long along the stride-1 axis: S when each
    (n, c) row is contiguous (``rows``), C otherwise."""
    if rows:
        block_s = min(triton.next_power_of_2(s), budget)
        return min(triton.next_power_of_2(c), max(1, budget // block_s // 4)), block_s
    block_c = min(triton.next_power_of_2(c), 128)
    return block_c, max(1, budget // block_c)


class _Geometry:
    """The (N, C, S) view of a dense tensor, its tile shapes (elementwise passes; reductions, whose
    three running summaries per value need smaller tiles to keep registers free) and how the
    reductions split the work."""

    def __init__(self, x: Tensor):
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        rows = x.is_contiguous() and s > 1
        if rows:  # S contiguous values per (n, c)
            self.n, self.s, self.strides = n, s, (c * s, s, 1)
        else:  # channels innermost: one row of C values per position
            self.n, self.s, self.strides = 1, n * s, (0, 1, c)
        self.c = c
        self.block_c, self.block_s = _tile_shape(c, self.s, rows, _TILE)
        self.reduce_block_c, self.reduce_block_s = _tile_shape(c, self.s, rows, _REDUCE_TILE)
        self.c_blocks = triton.cdiv(c, self.block_c)
        reduce_c_blocks = triton.cdiv(c, self.reduce_block_c)
        tiles = self.n * triton.cdiv(self.s, self.reduce_block_s)
        wanted = max(1, _programs(x.device) // reduce_c_blocks)
        self.tiles_per_program = triton.cdiv(tiles, min(wanted, tiles))
        self.splits = triton.cdiv(tiles, self.tiles_per_program)
        self.reduce_grid = (reduce_c_blocks, self.splits)

    def layout(self) -> dict:
        """The kernels' view arguments: channels, positions per row and the three strides."""
        sn, sc, ss = self.strides
        return dict(C=self.c, S=self.s, sn=sn, sc=sc, ss=ss)

    def tile_grid(self) -> tuple[int, int, int]:
        return triton.cdiv(self.s, self.block_s), self.c_blocks, self.n

    def elementwise(self) -> dict:
        """The elementwise kernels' view and tile arguments (grid: :meth:`tile_grid`)."""
        return dict(**self.layout(), **_launch(self.block_c, self.block_s))

    def reduction(self) -> dict:
        """The reduction kernels' view, run and tile arguments (grid: ``reduce_grid``)."""
        tiles = _launch(self.reduce_block_c, self.reduce_block_s)
        return dict(N=self.n, **self.layout(), tiles_per_program=self.tiles_per_program, **tiles)


def _launch(block_c: int, block_s: int) -> dict:
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8 if block_c * block_s >= 2048 else 4)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """How many reduction programs fill the device."""
    if device.type != "cuda":
        return 4  # the interpreter runs programs one after another: few is fastest
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_MERGE_BLOCK = 128


def _statistics(x: Tensor, geo: _Geometry) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance per channel, in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    count, mean, m2 = torch.empty((3, geo.splits, geo.c), dtype=acc, device=x.device)
    _stats_kernel[geo.reduce_grid](x, count, mean, m2, ACC=_tl_dtype(acc), **geo.reduction())
    return _merge(mean, m2, count)


def _merge(first: Tensor, second: Tensor, count: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The reduction programs' (splits, C) partials merged per channel: two sums added, or (with
    their ``count``) means and M2 by Chan's formula into (mean, biased variance)."""
    splits, c = first.shape
    out_first, out_second = torch.empty((2, c), dtype=first.dtype, device=first.device)
    _merge_kernel[(triton.cdiv(c, _MERGE_BLOCK),)](
        first,
        second,
        first if count is None else count,  # unread without CHAN
        out_first,
        out_second,
        c,
        splits,
        CHAN=count is not None,
        ACC=_tl_dtype(first.dtype),
        BLOCK_C=_MERGE_BLOCK,
    )
    return out_first, out_second


def _per_channel(x: Tensor, weight, bias, eps, activation, param) -> dict:
    """The kernels' affine and activation arguments (x stands in for an absent weight or bias: the
    pointer is never read) and their accumulation type."""
    return dict(
        w_ptr=x if weight is None else weight,
        b_ptr=x if bias is None else bias,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        eps=float(eps),
        param=float(param),
        ACT=ACTIVATION_CODES[activation],
        ACC=_tl_dtype(accumulation_dtype(x.dtype)),
    )


# --------------------------------------------------------------------------------------------
# the backend contract (bnlab.kernels.contract)
# --------------------------------------------------------------------------------------------


def _act_forward(x, weight, bias, running_mean, running_var, training, eps, activation, param, out):
    """:meth:`bnlab.kernels.contract.Kernels.batch_norm_act_forward`, every argument given: in
    training a statistics launch (and the merge of its partials), then one normalizing launch,
    straight into ``out`` when it is laid out like the kernels' view."""
    src = _dense_view(x)
    geo = _Geometry(src)
    if training:
        mean, var = _statistics(src, geo)
    else:
        mean, var = running_mean, running_var
    direct = out is not None and out.stride() == src.stride() and is_dense(out)
    y = out if direct else torch.empty_like(src)
    args = _per_channel(src, weight, bias, eps, activation, param)
    _normalize_kernel[geo.tile_grid()](src, y, mean, var, **args, **geo.elementwise())
    if out is not None and not direct:
        y = out.copy_(y)
    y = laid_out_like(y, x)
    if training:
        return y, mean, var
    empty = x.new_empty((0,), dtype=accumulation_dtype(x.dtype))
    return y, empty, empty.clone()


def _act_backward(
    grad_out, saved, weight, bias, mean, var, training, eps, activation, param, wanted, from_output
):
    """:meth:`bnlab.kernels.contract.Kernels.batch_norm_act_backward`, every argument given
    (``wanted``: the output mask), in the form
    dx = a dz - a invstd^2 (x - mean) sum(dz (x - mean)) / m - a sum(dz) / m, a = weight * invstd
    (eval: the first term). Two launches (and a merge of the partial sums): the sums, then dx;
    each recomputes z from x (or, ``from_output``, inverts the activation from y)."""
    src = _dense_view(saved)
    dy = laid_out_like(grad_out, src)
    geo = _Geometry(src)
    acc = accumulation_dtype(saved.dtype)
    args = _per_channel(src, weight, bias, eps, activation, param)
    args["FROM_OUTPUT"] = bool(from_output)
    sum_dz = sum_dzx = None
    if training or (weight is not None and wanted[1]) or wanted[2]:
        partial = torch.empty((2, geo.splits, geo.c), dtype=acc, device=src.device)
        _grad_sums_kernel[geo.reduce_grid](src, dy, *partial, mean, var, **args, **geo.reduction())
        sum_dz, sum_dzx = _merge(*partial)
    dx = dweight = dbias = None
    if wanted[0]:
        dx = torch.empty_like(src)
        sums = (sum_dz, sum_dzx) if training else (mean, mean)  # eval: unused pointers
        args.update(values=float(src.numel() // geo.c), TRAINING=bool(training))
        _grad_input_kernel[geo.tile_grid()](
            src, dy, dx, *sums, mean, var, **args, **geo.elementwise()
        )
        dx = laid_out_like(dx, saved)
    if weight is not None and wanted[1]:
        dweight = sum_dzx * torch.rsqrt(var.to(acc) + eps)
    if wanted[2]:
        dbias = sum_dz
    return dx, dweight, dbias


def batch_statistics(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """See :meth:`bnlab.kernels.contract.Kernels.batch_statistics` (no ``mask`` here)."""
    src = _dense_view(x)
    return _statistics(src, _Geometry(src))


batch_norm_act_forward = activated(fused=_act_forward)
batch_norm_act_backward = activated_backward(fused=_act_backward)
batch_norm_forward, batch_norm_backward = plain_from_fused(
    _act_forward, _act_backward, batch_statistics
)
