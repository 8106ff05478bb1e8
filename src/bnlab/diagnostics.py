"""Diagnostics that attach to any model: what batch normalization changes inside a network.

:class:`ActivationPercentiles` follows the distribution of one unit's input (or output) over
training, as Ioffe & Szegedy 2015, Figure 1 (b, c) does for "a typical sigmoid" of the last hidden
layer: its {15, 50, 85}th percentiles at every evaluation. Without BN the band drifts in mean and
width as the earlier layers change (internal covariate shift); with BN it stays put.

Example::

    tracker = ActivationPercentiles(model[-2], unit=0)   # the last sigmoid's input, unit 0
    for step in range(steps):
        train_step()
        if step % 500 == 0:
            accuracy(model.eval(), test_x, test_y)       # eval forwards are captured ...
            tracker.record(step)                         # ... and summarized here
    tracker.remove()
    tracker.history  # [{"step": 0, "p15": ..., "p50": ..., "p85": ...}, ...]
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ActivationPercentiles", "band_drift"]


class ActivationPercentiles:
    """Percentiles of one unit's input or output, captured by a forward hook.

    Args:
        module: the module to watch (e.g. an ``nn.Sigmoid``: its input is the sigmoid input).
        unit: the feature (dim 1: a Linear's output feature, a conv's channel) whose values are
            collected over every other dim (batch, and spatial positions for convolutions);
            None pools all units.
        percentiles: the percentiles, in [0, 100], recorded at every :meth:`record`.
        capture: ``"input"`` (the module's first positional input) or ``"output"``.
        training: capture only forwards with ``module.training == training``; the default False
            captures evaluation forwards alone (the test set or a fixed eval batch), so training
            steps cost nothing. None captures every forward.

    Details:
        - values are detached and kept (as float64 copies of the one unit) only between two
          :meth:`record` calls; ``record`` computes the percentiles over everything captured since
          the last one, with linear interpolation (``numpy.percentile``'s default), then clears;
        - non-finite values (a diverged network) are dropped before the percentiles; a record
          with no finite value stores NaN;
        - :meth:`state_dict` / :meth:`load_state_dict` carry the history through checkpoints;
        - :meth:`remove` (or leaving a ``with`` block) detaches the hook; the module is unchanged.
    """

    def __init__(
        self,
        module: nn.Module,
        unit: Optional[int] = 0,
        percentiles: Sequence[float] = (15, 50, 85),
        capture: str = "input",
        training: Optional[bool] = False,
    ) -> None:
        if capture not in ("input", "output"):
            raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
        percentiles = tuple(float(p) for p in percentiles)
        if not percentiles or not all(0.0 <= p <= 100.0 for p in percentiles):
            raise ValueError(
                f"percentiles must be a non-empty sequence in [0, 100], got {percentiles}"
            )
        if unit is not None and (not isinstance(unit, int) or unit < 0):
            raise ValueError(f"unit must be a non-negative int or None, got {unit!r}")
        self.module = module
        self.unit = unit
        self.percentiles = percentiles
        self.capture = capture
        self.training = training
        self.history: list[dict[str, float]] = []
        self._buffer: list[Tensor] = []
        self._handle = module.register_forward_hook(self._hook)

    # -- capture ---------------------------------------------------------------------------
    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        if self.training is not None and module.training != self.training:
            return
        value = args[0] if self.capture == "input" else output
        if not isinstance(value, Tensor):
            raise TypeError(
                f"ActivationPercentiles: the module's {self.capture} is a "
                f"{type(value).__name__}, expected a Tensor"
            )
        value = value.detach()
        if self.unit is not None:
            if value.dim() < 2:
                raise ValueError(
                    f"ActivationPercentiles: a {self.capture} of shape "
                    f"{tuple(value.shape)} has no feature dim 1 to pick unit {self.unit} from"
                )
            if self.unit >= value.shape[1]:
                raise ValueError(
                    f"ActivationPercentiles: unit {self.unit} out of range for "
                    f"{value.shape[1]} features"
                )
            value = value.select(1, self.unit)
        self._buffer.append(value.reshape(-1).to(torch.float64, copy=True))

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        """Detach the forward hook (idempotent); the history stays."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._buffer.clear()

    def __enter__(self) -> "ActivationPercentiles":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- summary ---------------------------------------------------------------------------
    @staticmethod
    def key(p: float) -> str:
        """The history key of a percentile: 15 -> "p15", 2.5 -> "p2.5"."""
        return f"p{p:g}"

    def pending(self) -> int:
        """Values captured since the last :meth:`record`."""
        return sum(t.numel() for t in self._buffer)

    def compute(self) -> dict[str, float]:
        """The percentiles of the values captured since the last record, without clearing them."""
        values = torch.cat(self._buffer) if self._buffer else torch.empty(0, dtype=torch.float64)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return {self.key(p): math.nan for p in self.percentiles}
        q = torch.tensor(self.percentiles, dtype=torch.float64) / 100.0
        result = torch.quantile(values, q, interpolation="linear")
        return {self.key(p): float(v) for p, v in zip(self.percentiles, result)}

    def record(self, step: int) -> dict[str, float]:
        """Append ``{"step": step, "p15": ..., ...}`` to :attr:`history` from the values captured
        since the last record, clear them and return the entry. Raises if nothing was captured."""
        if not self._buffer:
            skipped = {
                False: " (training-mode forwards are skipped: training=False)",
                True: " (eval-mode forwards are skipped: training=True)",
            }.get(self.training, "")
            raise RuntimeError(
                "ActivationPercentiles.record: nothing captured since the last "
                f"record; run a forward through the watched module first{skipped}"
            )
        entry = {"step": int(step), **self.compute()}
        self._buffer.clear()
        self.history.append(entry)
        return entry

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self._buffer.clear()

    def __repr__(self) -> str:
        return (
            f"ActivationPercentiles({type(self.module).__name__}, unit={self.unit}, "
            f"percentiles={self.percentiles}, capture={self.capture!r}, "
            f"{'attached' if self.attached else 'detached'}, {len(self.history)} records)"
        )


def band_drift(
    history: Sequence[dict],
    low: str = "p15",
    mid: str = "p50",
    high: str = "p85",
    start_step: int = 0,
) -> dict[str, float]:
    """How much a percentile band moved over training, from the first record at or after
    ``start_step`` to the last one:

    - ``median_change``: last p50 - first p50; ``spread_change``: last (p85 - p15) - first;
    - ``spread_ratio``: last spread / first spread;
    - ``median_range``: max - min of p50 over those records; ``spread_range``: the same of the
      spread;
    - ``first_step`` / ``last_step``: the records compared.
    """
    rows = [h for h in history if h["step"] >= start_step and math.isfinite(h[mid])]
    if not rows:
        raise ValueError(f"no finite record at or after step {start_step}")
    medians = [h[mid] for h in rows]
    spreads = [h[high] - h[low] for h in rows]
    first, last = rows[0], rows[-1]
    return {
        "first_step": first["step"],
        "last_step": last["step"],
        "median_first": medians[0],
        "median_last": medians[-1],
        "median_change": medians[-1] - medians[0],
        "median_range": max(medians) - min(medians),
        "spread_first": spreads[0],
        "spread_last": spreads[-1],
        "spread_change": spreads[-1] - spreads[0],
        "spread_ratio": spreads[-1] / spreads[0] if spreads[0] > 0 else math.inf,
        "spread_range": max(spreads) - min(spreads),
    }
