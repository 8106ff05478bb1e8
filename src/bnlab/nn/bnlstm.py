r"""Recurrent batch normalization: the BN-LSTM of Cooijmans et al. 2016 (https://arxiv.org/abs/1603.09025).

.. math::
    (\tilde f, \tilde i, \tilde o, \tilde g) = BN(W_h h_{t-1}; \gamma_h, 0) + BN(W_x x_t; \gamma_x, 0) + b

    c_t = \sigma(\tilde f) c_{t-1} + \sigma(\tilde i) \tanh(\tilde g)

    h_t = \sigma(\tilde o) \tanh(BN(c_t; \gamma_c, \beta_c))

Design (see SPEC.md section 3):

- **Gate order** in ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias``, ``weight_x``, ``weight_h``
  and the (max_length, 4H) statistics is torch.nn.LSTM's: (i, f, g, o).
- **Statistics per time step**: each of the three BNs has ``running_mean_*`` / ``running_var_*``
  buffers of shape (max_length, features); gamma (and beta_c) are shared over time. In eval, steps
  t >= max_length use step max_length - 1's statistics; in training a sequence longer than
  max_length is a ValueError. One ``num_batches_tracked`` per cell, incremented once per training
  forward (``momentum=None``, the cumulative average, is not supported).
- **Parameters**: ``weight_x`` (gamma_x, 4H), ``weight_h`` (gamma_h, 4H), ``weight_c`` (gamma_c, H),
  all initialized to ``gamma_init`` = 0.1; ``bias_c`` (beta_c, H) = 0; ``bias`` (b, 4H) = 0 except the
  forget gate, set to ``forget_bias`` (default 0.0, the spec's b = 0; 1.0 is a common choice).
- **Init** ``init="paper"`` (default): orthogonal ``weight_ih``, ``weight_hh`` = four stacked
  identities (the paper's (p)MNIST setup; needs nothing of the sizes). ``init="uniform"``:
  torch.nn.LSTM's U(-1/sqrt(H), 1/sqrt(H)) for both matrices.
- **Speed**: W_x x_t for all steps is one matmul, and its per-step BN is one
  :func:`bnlab.functional.batch_norm` call on the (N, T*4H) reshape (channel = (t, gate unit)) with the
  (T, 4H) running buffers viewed as (T*4H,); with variable lengths, one call per run of steps that
  share the same set of valid sequences. The recurrent part loops over time.
- **Variable lengths** (``lengths``, one per sequence, >= 1): at step t the valid rows are those with
  length > t; batch statistics (and the running-statistics count) use those rows only (the ``mask``
  of batch_norm), finished sequences keep their state (so h_n / c_n are each sequence's last valid
  state), and outputs at padding positions are zero. Padding inputs are replaced by 0 before use.
  Training needs >= 2 valid sequences at every step (a batch statistic of one value is undefined).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F

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
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("max_length", max_length)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if momentum is None or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1] (None is not supported), got {momentum}")
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
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
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
        self.bias[H:2 * H].fill_(self.forget_bias)  # (i, f, g, o): forget gate is block 1
        for p in (self.weight_x, self.weight_h, self.weight_c):
            p.fill_(self.gamma_init)
        self.bias_c.zero_()

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}, "
                f"gamma_init={self.gamma_init}, forget_bias={self.forget_bias}, "
                f"momentum={self.momentum}, eps={self.eps}, init={self.init!r}")

    # ---------------------------------------------------------------------------------------
    def _row(self, t: int) -> int:
        """The statistics row of step t (eval reuses the last one past max_length)."""
        if t >= self.max_length:
            if self.training:
                raise ValueError(
                    f"sequence of length > max_length = {self.max_length} in training (step {t}); "
                    f"build the module with a larger max_length"
                )
            return self.max_length - 1
        return t

    def _bn(self, x: Tensor, which: str, t: int, weight: Tensor, bias: Optional[Tensor],
            mask: Optional[Tensor]) -> Tensor:
        r = self._row(t)
        return F.batch_norm(
            x, getattr(self, f"running_mean_{which}")[r], getattr(self, f"running_var_{which}")[r],
            weight, bias, self.training, self.momentum, self.eps, mask=mask,
        )

    def _input_term(self, x: Tensor, t0: int, t1: int, mask: Optional[Tensor]) -> Tensor:
        """BN(W_x x_t; gamma_x, 0) for steps t0 <= t < t1 at once; x is (t1 - t0, N, 4H)."""
        T, N, G = x.shape
        flat = x.permute(1, 0, 2).reshape(N, T * G)  # channel = (t, gate unit)
        if self.training:
            self._row(t1 - 1)  # raises if too long
            mean = self.running_mean_x[t0:t1].view(-1)  # views: batch_norm updates the buffers
            var = self.running_var_x[t0:t1].view(-1)
        else:
            rows = torch.arange(t0, t1, device=x.device).clamp(max=self.max_length - 1)
            mean = self.running_mean_x[rows].reshape(-1)
            var = self.running_var_x[rows].reshape(-1)
        y = F.batch_norm(flat, mean, var, self.weight_x.repeat(T), None, self.training,
                         self.momentum, self.eps, mask=mask)
        return y.reshape(N, T, G).permute(1, 0, 2)

    def _recurrent(self, wx: Tensor, h: Tensor, c: Tensor, t: int, mask: Optional[Tensor]):
        """One step given the normalized input term wx (N, 4H) (bias not yet added)."""
        wh = self._bn(h @ self.weight_hh.t(), "h", t, self.weight_h, None, mask)
        gates = wh + wx + self.bias
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(self._bn(c_new, "c", t, self.weight_c, self.bias_c, mask))
        return h_new, c_new

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
            raise ValueError(f"expected input of shape (N, input_size) with input_size = "
                             f"{self.input_size}, got {tuple(input.shape)}")
        h, c = self._check_state(state, input.shape[0], input)
        if self.training and t == 0:
            self.num_batches_tracked.add_(1)
        wx = self._bn(input @ self.weight_ih.t(), "x", t, self.weight_x, None, mask)
        h_new, c_new = self._recurrent(wx, h, c, t, mask)
        if mask is not None:
            m = mask.unsqueeze(1)
            h_new, c_new = torch.where(m, h_new, h), torch.where(m, c_new, c)
        return h_new, c_new

    def forward_sequence(self, input: Tensor, state=None, lengths: Optional[Tensor] = None):
        """A whole sequence: input (T, N, I); lengths (N,) ints in [1, T] or None (all T).

        Returns output (T, N, H) (zero at padding) and the last valid (h, c), each (N, H).
        """
        if input.dim() != 3 or input.shape[2] != self.input_size:
            raise ValueError(f"expected input of shape (T, N, input_size) with input_size = "
                             f"{self.input_size}, got {tuple(input.shape)}")
        T, N, _ = input.shape
        h, c = self._check_state(state, N, input)
        H = self.hidden_size
        if lengths is None:
            steps, bounds, masks = T, [(0, T)], [None]
        else:
            lens = [int(v) for v in lengths.tolist()]
            steps = max(lens)
            valid = torch.arange(steps, device=input.device).unsqueeze(1) < lengths.to(input.device)
            input = input[:steps].masked_fill(~valid.unsqueeze(2), 0)
            # runs of steps with the same set of valid sequences: [previous length, next length)
            cuts = sorted({0, *lens})
            bounds = [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
            masks = [None if all(v > a for v in lens) else valid[a] for a, _ in bounds]
            if self.training:
                for (a, _), m in zip(bounds, masks):
                    if m is not None and int(m.sum()) < 2:
                        raise ValueError(
                            f"training needs at least 2 valid sequences at every step; step {a} has "
                            f"{int(m.sum())} (lengths {lens})"
                        )
        if self.training:
            self._row(steps - 1)
            self.num_batches_tracked.add_(1)
        proj = (input.reshape(steps * N, -1) @ self.weight_ih.t()).reshape(steps, N, 4 * H)
        outputs = []
        for (a, b), m in zip(bounds, masks):
            wx = self._input_term(proj[a:b], a, b, m)
            for t in range(a, b):
                h_new, c_new = self._recurrent(wx[t - a], h, c, t, m)
                if m is not None:
                    mm = m.unsqueeze(1)
                    h, c = torch.where(mm, h_new, h), torch.where(mm, c_new, c)
                    outputs.append(h_new.masked_fill(~mm, 0))
                else:
                    h, c = h_new, c_new
                    outputs.append(h_new)
        out = torch.stack(outputs)
        if steps < T:
            out = torch.cat([out, out.new_zeros(T - steps, N, H)])
        return out, (h, c)


class BNLSTM(nn.Module):
    """A stack of :class:`BNLSTMCell` layers with torch.nn.LSTM's interface.

    ``forward(input, hx=None, lengths=None)``: input (T, N, I) (or (N, T, I) with batch_first),
    hx = (h0, c0) each (num_layers, N, H) or None, lengths (N,) ints in [1, T] or None.
    Returns output (T, N, H) (batch_first: (N, T, H)), zero at padding, and (h_n, c_n) each
    (num_layers, N, H): each sequence's last valid state. ``dropout`` applies to the outputs of
    every layer but the last, in training only, as in torch.nn.LSTM. Keyword arguments after
    ``dropout`` go to every cell (``max_length``, ``gamma_init``, ``forget_bias``, ``momentum``,
    ``eps``, ``init``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 batch_first: bool = False, dropout: float = 0.0, *, max_length: int,
                 device=None, dtype=None, **cell_kwargs) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.max_length = batch_first, dropout, max_length
        self.cells = nn.ModuleList(
            BNLSTMCell(input_size if k == 0 else hidden_size, hidden_size, max_length,
                       device=device, dtype=dtype, **cell_kwargs)
            for k in range(num_layers)
        )

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, max_length={self.max_length}")

    def forward(self, input: Tensor, hx=None, lengths: Optional[Tensor] = None):
        if input.dim() != 3 or input.shape[2] != self.input_size:
            order = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
            raise ValueError(f"expected input of shape {order} with input_size = {self.input_size}, "
                             f"got {tuple(input.shape)}")
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
                    raise ValueError(f"expected {name} of shape (num_layers, N, hidden_size) = "
                                     f"{(L, N, H)}, got {tuple(s.shape)}")
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
            if lengths.shape != (N,) or lengths.dtype.is_floating_point:
                raise ValueError(f"expected integer lengths of shape ({N},), got "
                                 f"{lengths.dtype} {tuple(lengths.shape)}")
            if bool((lengths < 1).any()):
                raise ValueError(f"every sequence needs length >= 1 (zero-length sequences are not "
                                 f"supported), got lengths {lengths.tolist()}")
            if bool((lengths > T).any()):
                raise ValueError(f"lengths must be <= the input's T = {T}, got {lengths.tolist()}")
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
