r"""Recurrent batch normalization: the BN-LSTM of Cooijmans et al. 2016 (https://arxiv.org/abs/1603.09025).

.. math::
    (\tilde f, \tilde i, \tilde o, \tilde g)
        = BN(W_h h_{t-1}; \gamma_h, 0) + BN(W_x x_t; \gamma_x, 0) + b

    c_t = \sigma(\tilde f) c_{t-1} + \sigma(\tilde i) \tanh(\tilde g)

    h_t = \sigma(\tilde o) \tanh(BN(c_t; \gamma_c, \beta_c))

Design (Cooijmans et al. 2016, section 3):

- **Gate order** in ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias``, ``weight_x``,
  ``weight_h`` and the (max_length, 4H) statistics is torch.nn.LSTM's: (i, f, g, o).
- **Statistics per time step**: each of the three BNs has ``running_mean_*`` / ``running_var_*``
  buffers of shape (max_length, features); gamma (and beta_c) are shared over time. In eval, steps
  t >= max_length use step max_length - 1's statistics; in training a sequence longer than
  max_length is a ValueError. One ``num_batches_tracked`` per cell, incremented once per training
  forward (``momentum=None``, the cumulative average, is not supported).
- **Parameters**: ``weight_x`` (gamma_x, 4H), ``weight_h`` (gamma_h, 4H), ``weight_c`` (gamma_c, H),
  all initialized to ``gamma_init`` = 0.1; ``bias_c`` (beta_c, H) = 0; ``bias`` (b, 4H) = 0 except
  the forget gate, set to ``forget_bias`` (default 0.0, the paper's b = 0; 1.0 is a common choice).
- **Init** ``init="paper"`` (default): orthogonal ``weight_ih``, ``weight_hh`` = four stacked
  identities (the paper's (p)MNIST setup; needs nothing of the sizes). ``init="uniform"``:
  torch.nn.LSTM's U(-1/sqrt(H), 1/sqrt(H)) for both matrices.
- **Speed**: the input term of all steps is one batched op: with I <= N its per-step statistics come
  from the (I, I) covariance of x_t (var = w^T Cov(x_t) w) and the normalization is folded into
  per-step weights, one ``baddbmm``; with I > N, W_x x_t is formed and normalized with plain torch
  ops. The recurrence loops over time with nothing but plain torch ops: one ``mm``, the native
  ``torch.batch_norm`` (fused forward, backward and running-statistics update) for the recurrent and
  cell BNs, one ``sigmoid`` over all gates; no host synchronization inside the loop.
- **Population statistics** (:func:`bnlab.inference.population_statistics`): the cell reports every
  training batch statistic to ``observer`` (which term, first step, mean, biased variance, count),
  and each step's row of the running buffers becomes Algorithm 2's average over the batches that
  reached that step; rows no batch reached are left as they were. Given one batch (many batches
  concatenated), every step normalizes with the statistics it then stores, so they describe the
  values eval mode computes; an average over small batches describes values computed with each
  batch's own statistics at the earlier steps, which eval mode can amplify (row-by-row MNIST's
  nearly blank top rows: up to 4 points of test accuracy, docs/results/seq-mnist).
- **Batch-constant leading steps** (training): steps at which every sequence has the same input and
  state (MNIST's blank first pixels) normalize to the shift exactly and pass no gradient through
  the BNs (see :meth:`BNLSTMCell._constant_forward`), instead of overflowing float32.
- **Variable lengths** (``lengths``, one per sequence, >= 1, or a prefix ``mask`` (T, N)): the batch
  is sorted by length (descending) so the valid rows of every step are a prefix; each step runs on
  its valid rows only, so batch statistics (and the running statistics) use those rows alone and
  padding never enters them. Finished sequences keep their state (h_n / c_n are each sequence's last
  valid state) and outputs at padding positions are zero. Training needs >= 2 valid sequences at
  every step (a batch statistic of one value is undefined).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..statistics import (
    count_batch,
    unbiased_factor,
    update_running_stats,
    updates_deferred,
    variance_from_invstd,
)

__all__ = ["BNLSTMCell", "BNLSTM"]


class BNLSTMCell(nn.Module):
    """One BN-LSTM layer with per-time-step statistics.

    ``forward(input, state, t)`` runs one step (input (N, I), state (h, c) each (N, H), t the step
    index that picks the statistics); :meth:`forward_sequence` runs a whole (T, N, I) sequence, with
    the input projection and its normalization batched over time. Both give the same values.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_length: int,
        *,
        gamma_init: float = 0.1,
        forget_bias: float = 0.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
        init: str = "paper",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("max_length", max_length),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if momentum is None or not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum must be a float in [0, 1] (None is not supported), got {momentum}"
            )
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if init not in ("paper", "uniform"):
            raise ValueError(f"init must be 'paper' or 'uniform', got {init!r}")
        f = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.max_length = input_size, hidden_size, max_length
        self.gamma_init, self.forget_bias, self.init = gamma_init, forget_bias, init
        self.momentum, self.eps = momentum, eps
        G = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **f))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **f))
        self.bias = nn.Parameter(torch.empty(G, **f))
        self.weight_x = nn.Parameter(torch.empty(G, **f))
        self.weight_h = nn.Parameter(torch.empty(G, **f))
        self.weight_c = nn.Parameter(torch.empty(hidden_size, **f))
        self.bias_c = nn.Parameter(torch.empty(hidden_size, **f))
        for which, width in (("x", G), ("h", G), ("c", hidden_size)):
            self.register_buffer(f"running_mean_{which}", torch.zeros(max_length, width, **f))
            self.register_buffer(f"running_var_{which}", torch.ones(max_length, width, **f))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        # observer(which, t0, mean, var, count) of every training batch statistic: which in "xhc",
        # mean and biased var (S, F) for steps t0..t0+S-1 over count rows (bnlab.inference sets it)
        self.observer: Optional[Callable[[str, int, Tensor, Tensor, int], None]] = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        for which in "xhc":
            getattr(self, f"running_mean_{which}").zero_()
            getattr(self, f"running_var_{which}").fill_(1)
        self.num_batches_tracked.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.reset_running_stats()
        H = self.hidden_size
        if self.init == "paper":
            nn.init.orthogonal_(self.weight_ih)
            self.weight_hh.copy_(torch.eye(H).repeat(4, 1))
        else:
            bound = 1.0 / math.sqrt(H)
            nn.init.uniform_(self.weight_ih, -bound, bound)
            nn.init.uniform_(self.weight_hh, -bound, bound)
        self.bias.zero_()
        self.bias[H : 2 * H].fill_(self.forget_bias)  # (i, f, g, o): forget gate is block 1
        for p in (self.weight_x, self.weight_h, self.weight_c):
            p.fill_(self.gamma_init)
        self.bias_c.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}, "
            f"gamma_init={self.gamma_init}, forget_bias={self.forget_bias}, "
            f"momentum={self.momentum}, eps={self.eps}, init={self.init!r}"
        )

    # ---------------------------------------------------------------------------------------
    def _rows(self, t0: int, t1: int):
        """The statistics rows of steps t0 <= t < t1 (eval reuses the last one past max_length)."""
        if t1 <= self.max_length:
            return slice(t0, t1)
        if self.training:
            raise ValueError(
                f"sequence of length {t1} > max_length = {self.max_length} in training; "
                f"build the module with a larger max_length"
            )
        return torch.arange(t0, t1, device=self.running_mean_x.device).clamp(
            max=self.max_length - 1
        )

    def _input_term(self, x: Tensor, t0: int) -> Tensor:
        """BN(W_x x_t; gamma_x, 0) + b of steps t0, t0 + 1, ... at once; x (S, k, I): valid rows.

        Returns (S, k, 4H). With I <= k the statistics of W_x x_t come from the (I, I) covariance of
        x_t (var_j = w_j^T Cov(x_t) w_j) and the normalization is folded into the weights, one
        batched matmul: no (S, k, 4H) temporaries besides the result. Otherwise W_x x_t is formed
        first and normalized directly.
        """
        S, k, I = x.shape
        rows = self._rows(t0, t0 + S)
        w_t = self.weight_ih.t()  # (I, 4H)
        via_cov = I <= k
        if self.training:
            mean_x = x.mean(1, keepdim=True)  # (S, 1, I)
            x = x - mean_x
            if via_cov:
                cov = torch.bmm(x.transpose(1, 2), x) / k  # (S, I, I), biased
                var = (torch.matmul(cov, w_t) * w_t).sum(1).clamp(min=0)  # (S, 4H)
            else:
                proj = torch.matmul(x, w_t)  # (S, k, 4H), centred
                var = proj.square().mean(1)
            mean = mean_x.squeeze(1) @ w_t  # (S, 4H)
            if self.observer is not None:
                self.observer("x", t0, mean, var, k)
            # EMA with the unbiased variance, as torch.batch_norm does for h and c below, and
            # skipped for non-finite statistics
            self._record("x", t0, mean, var * unbiased_factor(k), k)
            mean = None  # x is centred already
        else:
            mean, var = self.running_mean_x[rows], self.running_var_x[rows]
            if not via_cov:
                proj = torch.matmul(x, w_t)
        scale = _scale(self.weight_x, var, self.eps, constant_is_zero=not self.training)  # (S, 4H)
        shift = self.bias if mean is None else self.bias - mean * scale  # (4H,) or (S, 4H)
        shift = shift.expand(S, -1).unsqueeze(1)  # (S, 1, 4H)
        if via_cov:
            return torch.baddbmm(shift, x, w_t * scale.unsqueeze(1))  # weights (S, I, 4H)
        return torch.addcmul(shift, proj, scale.unsqueeze(1))

    def _step(self, wx: Tensor, h: Tensor, c: Tensor, t: int, weight_hh_t: Tensor):
        """One step of the k valid rows: wx = BN_x + b (k, 4H), h and c (k, H) -> (h_t, c_t)."""
        r, H = min(t, self.max_length - 1), self.hidden_size
        uh = torch.mm(h, weight_hh_t)  # (k, 4H)
        if self.observer is not None and self.training:
            self._observe("h", t, uh)
        gates = self._bn(uh, "h", r, self.weight_h, None) + wx
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # the g block's sigmoid is wasted but cheap
        c = torch.addcmul(f * c, i, torch.tanh(gates[:, 2 * H : 3 * H]))
        if self.observer is not None and self.training:
            self._observe("c", t, c)
        return o * torch.tanh(self._bn(c, "c", r, self.weight_c, self.bias_c)), c

    def _record(self, which: str, t0: int, mean: Tensor, unbiased_var: Tensor, count: int) -> None:
        """Fold steps t0, t0 + 1, ...'s statistics (S, F) into their rows of the running ones.
        Deferred (bnlab.accumulate): one record per step, each step's rows being their own batch
        norm, so that micro-batches processed in different chunks of steps still merge per step."""
        running_mean = getattr(self, f"running_mean_{which}")
        running_var = getattr(self, f"running_var_{which}")
        steps = range(t0, t0 + mean.shape[0])
        if not updates_deferred(running_mean):
            rows = slice(steps.start, steps.stop)
            update_running_stats(
                running_mean[rows], running_var[rows], None, mean, unbiased_var, self.momentum
            )
            return
        for s, t in enumerate(steps):
            update_running_stats(
                running_mean[t],
                running_var[t],
                None,
                mean[s],
                unbiased_var[s],
                self.momentum,
                count=count,
            )

    def _bn(self, x: Tensor, which: str, r: int, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Step r's BN of x (k, F): torch.batch_norm in training (batch statistics, fused running
        update); in eval, the running statistics, features of variance 0 giving the shift."""
        mean, var = (
            getattr(self, f"running_mean_{which}")[r],
            getattr(self, f"running_var_{which}")[r],
        )
        if self.training and updates_deferred(mean):  # ATen's update must wait: record instead
            y, batch_mean, invstd = torch.native_batch_norm(
                x, weight, bias, mean.clone(), var.clone(), True, 0.0, self.eps
            )
            batch_var = variance_from_invstd(invstd.detach().double(), self.eps)
            k = x.shape[0]
            self._record(
                which, r, batch_mean.detach()[None], (batch_var * k / (k - 1)).to(x.dtype)[None], k
            )
            return y
        if self.training:
            return torch.batch_norm(
                x, weight, bias, mean, var, True, self.momentum, self.eps, False
            )
        scale = _scale(weight, var, self.eps, constant_is_zero=True)
        return torch.addcmul(-mean * scale if bias is None else bias - mean * scale, x, scale)

    def _observe(self, which: str, t: int, values: Tensor) -> None:
        var, mean = torch.var_mean(values.detach(), 0, correction=0)
        self.observer(which, t, mean.unsqueeze(0), var.unsqueeze(0), values.shape[0])

    @staticmethod
    def _constant_steps(x: Tensor, h: Tensor, c: Tensor) -> int:
        """How many leading steps of x (S, N, I) are the same for every sequence, the state too."""
        if not (torch.equal(h, h[:1].expand_as(h)) and torch.equal(c, c[:1].expand_as(c))):
            return 0
        same = (x == x[:, :1]).flatten(1).all(1)  # (S,)
        return int(same.int().cumprod(0).sum())

    def _constant_forward(self, x: Tensor, h: Tensor, c: Tensor):
        """Training steps at which every sequence has the same input and state (the blank first
        pixels of MNIST): x (S, N, I), h and c (N, H), all rows equal.

        Every BN then sees features that are constant over the batch: its output is exactly its
        shift (0, or beta_c for the cell) and its statistics are (value, variance 0). Its exact
        input gradient, gamma / sqrt(eps) times the deviation from the batch mean, is left out: it
        lies in the direction in which the sequences differ, so it reaches no parameter, and
        compounded over a long constant prefix it overflows float32 (eps = 1e-5, gamma = 0.1: about
        250x per step) and turns every parameter gradient into NaN. The cell path c_t = f c_{t-1} +
        i g keeps its gradient. Returns outputs (S, N, H) and the state (h, c) after the steps.
        """
        S, N, _ = x.shape
        H = self.hidden_size
        i, f, _, o = torch.sigmoid(self.bias).chunk(4)  # the gates are b: both BN terms are 0
        ig = i * torch.tanh(self.bias[2 * H : 3 * H])
        h_out = o * torch.tanh(self.bias_c)  # (H,): BN(c_t) = beta_c
        cs = []
        for _ in range(S):
            c = torch.addcmul(ig, f, c)  # (N, H), rows equal
            cs.append(c)
        with torch.no_grad():
            h_rows = torch.cat([h[:1], h_out.expand(S - 1, H)])  # h_{t-1} of each step
            means = {
                "x": x[:, 0] @ self.weight_ih.t(),
                "h": h_rows @ self.weight_hh.t(),
                "c": torch.stack([v[0] for v in cs]),
            }
            for which, mean in means.items():  # the guarded update, variance 0
                self._record(which, 0, mean, torch.zeros_like(mean), N)
                if self.observer is not None:
                    self.observer(which, 0, mean, torch.zeros_like(mean), N)
        return h_out.expand(S, N, H), (h_out.expand(N, H), c)

    def _check_state(self, state, N, ref: Tensor):
        H = self.hidden_size
        if state is None:
            z = ref.new_zeros(N, H)
            return z, z
        h, c = state
        for name, s in (("h", h), ("c", c)):
            if tuple(s.shape) != (N, H):
                raise ValueError(f"expected {name} of shape {(N, H)}, got {tuple(s.shape)}")
        return h, c

    def forward(self, input: Tensor, state=None, t: int = 0, mask: Optional[Tensor] = None):
        """One step: input (N, I), state (h, c) each (N, H) or None (zeros), t the step index.

        ``mask`` (N,) bool: rows that are valid at this step (statistics over those only; the
        returned state of the other rows is the one given). Returns (h_t, c_t).
        """
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise ValueError(
                f"expected input of shape (N, input_size) with input_size = "
                f"{self.input_size}, got {tuple(input.shape)}"
            )
        h, c = self._check_state(state, input.shape[0], input)
        idx = None if mask is None else mask.nonzero().flatten()
        k = input.shape[0] if idx is None else idx.numel()
        if self.training:
            self._rows(t, t + 1)
            _require_two(k, f"step {t}")
            if t == 0:
                count_batch(self.num_batches_tracked)
        xs, hs, cs = (input, h, c) if idx is None else (input[idx], h[idx], c[idx])
        wx = self._input_term(xs.unsqueeze(0), t)[0]
        h_new, c_new = self._step(wx, hs, cs, t, self.weight_hh.t())
        if idx is not None:
            h_new, c_new = h.index_copy(0, idx, h_new), c.index_copy(0, idx, c_new)
        return h_new, c_new

    def forward_sequence(self, input: Tensor, state=None, lengths: Optional[Tensor] = None):
        """A whole sequence: input (T, N, I); lengths (N,) ints in [1, T] or None (all T).

        Returns output (T, N, H) (zero at padding) and the last valid (h, c), each (N, H).
        """
        if input.dim() != 3 or input.shape[2] != self.input_size:
            raise ValueError(
                f"expected input of shape (T, N, input_size) with input_size = "
                f"{self.input_size}, got {tuple(input.shape)}"
            )
        T, N, _ = input.shape
        if T == 0 or N == 0:
            raise ValueError(f"expected a non-empty input, got shape {tuple(input.shape)}")
        h, c = self._check_state(state, N, input)
        order = None
        if lengths is None:
            steps, runs = T, [(0, T, N)]
        else:  # sort by length (descending): the valid rows of every step are a prefix
            lens = check_lengths(lengths, N, T)
            order = sorted(range(N), key=lambda n: -lens[n])
            steps = max(lens)
            cuts = sorted({0, *lens})
            runs = [(a, b, sum(v > a for v in lens)) for a, b in zip(cuts[:-1], cuts[1:])]
            idx = torch.tensor(order, device=input.device)
            input, h, c = input[:steps, idx], h[idx], c[idx]
        if self.training:
            self._rows(0, steps)
            for a, _, k in runs:
                _require_two(k, f"step {a}" + ("" if order is None else f" (lengths {lens})"))
            count_batch(self.num_batches_tracked)
        weight_hh_t = self.weight_hh.t()
        outputs, done_h, done_c = [], [], []
        if self.training:
            same = self._constant_steps(input[: runs[0][1]], h, c)
            if same:
                out, (h, c) = self._constant_forward(input[:same], h, c)
                outputs.append(out)
                runs[0] = (same, *runs[0][1:])
        for a, b, k in runs:
            if a == b:
                continue
            if k < h.shape[0]:  # rows k.. have ended: their state is final
                done_h.append(h[k:])
                done_c.append(c[k:])
                h, c = h[:k], c[:k]
            wx = self._input_term(input[a:b, :k], a)  # (b - a, k, 4H)
            outs = []
            for t, wx_t in zip(range(a, b), wx.unbind(0)):  # unbind: one backward op, not T slices
                h, c = self._step(wx_t, h, c, t, weight_hh_t)
                outs.append(h)
            out = torch.stack(outs)
            outputs.append(out if k == N else nn.functional.pad(out, (0, 0, 0, N - k)))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if steps < T:
            out = nn.functional.pad(out, (0, 0, 0, 0, 0, T - steps))
        if order is not None:
            h, c = torch.cat([h, *done_h[::-1]]), torch.cat([c, *done_c[::-1]])
            inv = torch.argsort(idx)
            out, h, c = out[:, inv], h[inv], c[inv]
        return out, (h, c)


def _scale(weight: Tensor, var: Tensor, eps: float, constant_is_zero: bool) -> Tensor:
    """gamma / sqrt(var + eps); with ``constant_is_zero`` (eval), 0 where the running variance is
    exactly 0: a feature that was constant in every training batch normalized to 0 there (its BN
    gave the shift), and so it does in eval, instead of (x - running_mean) * gamma / sqrt(eps)
    turning rounding differences and the running mean's lag into large values that compound
    from step to step."""
    scale = weight * torch.rsqrt(var + eps)
    return torch.where(var > 0, scale, 0.0) if constant_is_zero else scale


def _require_two(k: int, where: str) -> None:
    if k < 2:
        raise ValueError(
            f"training needs at least 2 valid sequences at every step; {where} has {k}"
        )


def lengths_from_mask(mask: Tensor, T: int, N: int) -> Tensor:
    """The lengths (N,) of a (T, N) bool mask that is True on a prefix of every column."""
    if mask.shape != (T, N) or mask.dtype != torch.bool:
        raise ValueError(
            f"expected a bool mask of shape (T, N) = {(T, N)} (batch_first: (N, T)), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    lengths = mask.sum(0)
    prefix = torch.arange(T, device=mask.device).unsqueeze(1) < lengths
    if not torch.equal(prefix, mask):
        bad = (prefix != mask).any(0).nonzero().flatten().tolist()
        raise ValueError(
            f"mask must be True on a prefix of each sequence (padding at the end); "
            f"sequences {bad[:10]} are not"
        )
    return lengths


def check_lengths(lengths, N: int, T: int) -> list[int]:
    """``lengths`` (N,) integers in [1, T] as a list, or a ValueError saying what is wrong."""
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (N,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"expected integer lengths of shape ({N},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    lens = [int(v) for v in lengths.tolist()]
    if min(lens) < 1:
        raise ValueError(
            f"every sequence needs length >= 1 (zero-length sequences are not "
            f"supported), got lengths {lens}"
        )
    if max(lens) > T:
        raise ValueError(f"lengths must be <= the input's T = {T}, got {lens}")
    return lens


class BNLSTM(nn.Module):
    """A stack of :class:`BNLSTMCell` layers with torch.nn.LSTM's interface.

    ``forward(input, hx=None, lengths=None, mask=None)``: input (T, N, I) (or (N, T, I) with
    batch_first), hx = (h0, c0) each (num_layers, N, H) or None; variable lengths as ``lengths``
    (N,) ints in [1, T], or as ``mask`` (T, N) bool (batch_first: (N, T)), True on each sequence's
    valid steps, which must be a prefix (padding at the end).
    Returns output (T, N, H) (batch_first: (N, T, H)), zero at padding, and (h_n, c_n) each
    (num_layers, N, H): each sequence's last valid state. ``dropout`` applies to the outputs of
    every layer but the last, in training only, as in torch.nn.LSTM. Keyword arguments after
    ``dropout`` go to every cell (``max_length``, ``gamma_init``, ``forget_bias``, ``momentum``,
    ``eps``, ``init``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        max_length: int,
        device=None,
        dtype=None,
        **cell_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.max_length = batch_first, dropout, max_length
        self.cells = nn.ModuleList(
            BNLSTMCell(
                input_size if k == 0 else hidden_size,
                hidden_size,
                max_length,
                device=device,
                dtype=dtype,
                **cell_kwargs,
            )
            for k in range(num_layers)
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, max_length={self.max_length}"
        )

    def forward(
        self,
        input: Tensor,
        hx=None,
        lengths: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ):
        if input.dim() != 3 or input.shape[2] != self.input_size:
            order = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
            raise ValueError(
                f"expected input of shape {order} with input_size = {self.input_size}, "
                f"got {tuple(input.shape)}"
            )
        if self.batch_first:
            input = input.transpose(0, 1)
        T, N, _ = input.shape
        if T == 0 or N == 0:
            raise ValueError(f"expected a non-empty input, got shape {tuple(input.shape)}")
        L, H = self.num_layers, self.hidden_size
        if hx is not None:
            h0, c0 = hx
            for name, s in (("h0", h0), ("c0", c0)):
                if tuple(s.shape) != (L, N, H):
                    raise ValueError(
                        f"expected {name} of shape (num_layers, N, hidden_size) = "
                        f"{(L, N, H)}, got {tuple(s.shape)}"
                    )
        if mask is not None:
            if lengths is not None:
                raise ValueError("give lengths or mask, not both")
            lengths = lengths_from_mask(mask.transpose(0, 1) if self.batch_first else mask, T, N)
        if lengths is not None:
            lengths = check_lengths(lengths, N, T)
        hs, cs = [], []
        x = input
        for k, cell in enumerate(self.cells):
            state = None if hx is None else (hx[0][k], hx[1][k])
            x, (h, c) = cell.forward_sequence(x, state, lengths)
            hs.append(h)
            cs.append(c)
            if k < L - 1 and self.dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.dropout, True)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(hs), torch.stack(cs))
