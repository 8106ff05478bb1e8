"""Learning-rate schedules shared by experiments: a constant rate with one optional final drop.

A config with the fields ``lr``, ``steps``, ``lr_drop_at`` (a fraction of the steps, or None for a
constant rate) and ``lr_drop`` (the factor) describes the schedule; Figure 1 (fig1) and the
sequential-MNIST experiments (seq-mnist, pmnist) use it. The rate of a step is a function of the
step alone, so a resumed run needs no schedule state.
"""

from __future__ import annotations

from typing import Optional, Protocol


class DropSchedule(Protocol):
    """The config fields a one-drop schedule reads."""

    lr: float
    steps: int
    lr_drop_at: Optional[float]
    lr_drop: float


def drop_step(c: DropSchedule) -> Optional[int]:
    """The last step at the full rate (None: the rate never drops)."""
    return None if c.lr_drop_at is None or c.lr_drop == 1 else round(c.lr_drop_at * c.steps)


def lr_at_step(c: DropSchedule, step: int) -> float:
    """The learning rate of step ``step`` (1-based): ``lr``, times ``lr_drop`` after the drop."""
    drop = drop_step(c)
    return c.lr * c.lr_drop if drop is not None and step > drop else c.lr


def describe_schedule(c: DropSchedule) -> str:
    """The schedule in words for reports and plot titles: ``lr 0.5, x0.1 after step 12,000``."""
    drop = drop_step(c)
    if drop is None:
        return f"lr {c.lr:g}"
    return f"lr {c.lr:g}, x{c.lr_drop:g} after step {drop:,}"
