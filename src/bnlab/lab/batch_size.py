"""Batch size: batch norm against layer norm against no normalization, across batch sizes.

BN's statistics come from the mini-batch, so they get noisy (and unlike the population statistics
used at test time) as the batch shrinks; layer norm's come from each example alone, identical in
training and inference, so it does not care (Ba et al. 2016; the cs231n assignment's batch-size
experiment). A ReLU MLP is trained with Adam for the same number of epochs at each batch size
(with a floor on the number of steps so that large batches are not simply under-trained).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from ..data import Split
from .common import check_positive, sweep, train_mlp
from .datasets import DatasetConfig
from .reports import batch_size_axes, heading, pct, pyplot, save, staged_report, table
from .runner import Run, RunView, experiment

NORMS = (("none", "no normalization"), ("bn", "BatchNorm"), ("ln", "LayerNorm"))


@dataclass
class BatchSizeConfig(DatasetConfig):
    batch_sizes: tuple[int, ...] = (  # examples per mini-batch (>= 2: BN needs two)
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
    )
    norms: tuple[str, ...] = ("none", "bn", "ln")  # none, bn (BatchNorm1d), ln (LayerNorm)
    epochs: Optional[float] = None  # passes over the data per batch size; None: 6 digits, 1 mnist
    min_steps: int = 200  # at least this many steps (large batches)
    lr: float = 1e-3  # Adam, every batch size (cs231n's setting)
    hidden: int = 100  # units per hidden layer
    depth: int = 3  # hidden layers (ReLU)
    seed: int = 0  # initialization and mini-batch order
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "BatchSizeConfig":
        c = replace(
            self,
            epochs=self.epochs
            if self.epochs is not None
            else (1.0 if self.dataset == "mnist" else 6.0),
        )
        check_positive(c, "epochs", "lr", "hidden", "depth")
        if not c.batch_sizes or min(c.batch_sizes) < 2:
            raise ValueError(
                "batch sizes must be >= 2 (BN needs more than one value per feature), "
                f"got {c.batch_sizes}"
            )
        bad = [n for n in c.norms if n not in dict(NORMS)]
        if bad or not c.norms:
            raise ValueError(f"unknown norm(s) {bad}; expected some of {[n for n, _ in NORMS]}")
        return c

    def steps(self, batch_size: int, n: int) -> int:
        return max(self.min_steps, round(self.epochs * n / batch_size))


@dataclass
class NormEnds:
    """One normalization's final test accuracy at the smallest and the largest batch size."""

    smallest_batch: float
    largest_batch: float
    range: float  # max - min over every batch size run


@dataclass
class BatchSizeSummary:
    """Every number the batch-size report quotes, computed once from the run's rows."""

    accuracy: dict[tuple[str, int], Optional[float]]  # (norm, batch) -> final (None: not run)
    ends: dict[str, NormEnds]  # norms that have both the smallest and the largest batch

    def headline(self) -> dict[str, Any]:
        """summary.json: each normalization's ends and range."""
        return {norm: asdict(ends) for norm, ends in self.ends.items()}


def _key(norm: str, b: int) -> str:
    """The job of one normalization at one batch size, e.g. "ln/b=32"."""
    return f"{norm}/b={b}"


def summarize(view: RunView) -> BatchSizeSummary:
    """The final test accuracy of every (norm, batch size) job and each norm's sensitivity."""
    c: BatchSizeConfig = view.config
    accuracy = {(n, b): _final_accuracy(view, _key(n, b)) for n in c.norms for b in c.batch_sizes}
    small, large = min(c.batch_sizes), max(c.batch_sizes)
    ends = {}
    for n in c.norms:
        if accuracy[n, small] is not None and accuracy[n, large] is not None:
            values = [accuracy[n, b] for b in c.batch_sizes if accuracy[n, b] is not None]
            ends[n] = NormEnds(accuracy[n, small], accuracy[n, large], max(values) - min(values))
    return BatchSizeSummary(accuracy, ends)


def _final_accuracy(view: RunView, key: str) -> Optional[float]:
    last = view.last(key)
    return None if last is None else last["test_accuracy"]


LABELS = dict(NORMS)
PLOT = "accuracy_vs_batch_size.png"


def plot(view: RunView, s: BatchSizeSummary) -> None:
    """Final test accuracy against the batch size (log2), one curve per normalization."""
    c: BatchSizeConfig = view.config
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for n in c.norms:
        done = [b for b in c.batch_sizes if s.accuracy[n, b] is not None]
        ax.plot(done, [100 * s.accuracy[n, b] for b in done], "o-", label=LABELS[n])
    batch_size_axes(
        ax, c.batch_sizes, f"{c.dataset}: {c.depth}x{c.hidden} ReLU MLP, Adam, {c.epochs:g} epochs"
    )
    save(fig, view.plot_path(PLOT))


def render(s: BatchSizeSummary, c: BatchSizeConfig) -> str:
    """report.md: the setup, the accuracy table and each normalization's sensitivity."""
    small, large = min(c.batch_sizes), max(c.batch_sizes)
    lines = [
        *heading(
            "Batch size: BN vs layer norm vs no normalization",
            f"Dataset **{c.dataset}**; ReLU MLP with {c.depth} hidden layers of {c.hidden} "
            f"units, the normalization after each hidden Linear; Adam (lr {c.lr:g}) for "
            f"{c.epochs:g} epochs at each batch size (at least {c.min_steps} steps), seed "
            f"{c.seed}. Test accuracy (%) at the end, in eval mode (BN uses its running "
            "statistics).",
        ),
        *table(
            ["normalization", *map(str, c.batch_sizes)],
            [[LABELS[n], *[pct(s.accuracy[n, b]) for b in c.batch_sizes]] for n in c.norms],
        ),
        "",
        f"![accuracy vs batch size]({PLOT})",
        "",
    ]
    for n, e in s.ends.items():
        lines.append(
            f"- {LABELS[n]}: {pct(e.smallest_batch)}% at batch {small}, "
            f"{pct(e.largest_batch)}% at batch {large}; "
            f"max - min over batch sizes {pct(e.range)} points."
        )
    lines.append("")
    return "\n".join(lines)


@experiment("batch-size", BatchSizeConfig, staged_report(summarize, plot, render))
def batch_size(run: Run) -> None:
    """BN vs layer norm vs no normalization across batch sizes 2..256."""
    c: BatchSizeConfig = run.config

    def job(data: Split, b: int, norm: str) -> None:
        train_mlp(
            run,
            _key(norm, b),
            data,
            c,
            norm=norm,
            optimizer=lambda p: torch.optim.Adam(p, lr=c.lr),
            steps=c.steps(b, len(data.train_y)),
            batch_size=b,
            tags={"norm": norm, "batch_size": b},
        )

    sweep(run, c.batch_sizes, c.norms, job)
