"""Initialization scale: final accuracy against the weight-initialization scale, with and without
BN.

The cs231n batch-normalization assignment's experiment: a deep ReLU MLP whose weights are drawn from
N(0, scale^2) for 20 scales np.logspace(-4, 0, 20), trained with Adam; without BN only a narrow band
of scales trains (too small: the signal vanishes through the layers; too large: it explodes), with
BN almost every scale does, since BN(W u) = BN(a W u) removes the scale of each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
import torch

from ..data import Split
from .common import (
    NETS,
    NetSweep,
    ascending_positive,
    check_positive,
    evaluate,
    finished,
    per_net,
    per_net_lines,
)
from .datasets import DatasetConfig, by_dataset
from .reports import heading, pct, plot_percent, pyplot, save, staged_report, style_axes, table
from .runner import Run, RunView, experiment


@dataclass
class InitConfig(DatasetConfig):
    scales: tuple[float, ...] = tuple(  # weight std of every Linear: cs231n's logspace(-4, 0, 20)
        float(s) for s in np.logspace(-4, 0, 20)
    )
    steps: Optional[int] = None  # Adam steps per net and scale; None: 400 on digits, 1,000 on mnist
    batch_size: int = 50  # cs231n's
    lr: float = 1e-3  # Adam (cs231n's setting)
    hidden: int = 50  # units per hidden layer (cs231n: 50)
    depth: int = 7  # hidden layers (cs231n: an 8-layer net, 7 hidden layers)
    seed: int = 0  # initialization and mini-batch order (the same for every job)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "InitConfig":
        c = replace(self, steps=by_dataset(self.steps, self.dataset, 400, 1000))
        check_positive(c, "steps", "batch_size", "lr", "hidden", "depth")
        return replace(c, scales=ascending_positive("scales", c.scales))


@dataclass
class NetScales:
    """How one net fared across the initialization scales it finished."""

    best_accuracy: float
    good_scales: list[float]  # ascending: the scales within 90% of the best test accuracy
    finished: int  # scales with a result
    diverged: int  # of those, the jobs whose loss went non-finite


@dataclass
class InitSummary:
    """Every number the initialization-scale report quotes, computed once from the run's rows."""

    finals: dict[tuple[str, float], Optional[dict]]  # (net, scale) -> last row (None: not run)
    nets: dict[str, NetScales]  # the nets with at least one finished scale

    def headline(self) -> dict[str, Any]:
        """summary.json: per net, the best accuracy, the scales within 90% of it, divergences."""
        return {
            net: {
                "best_accuracy": n.best_accuracy,
                "scales_within_90pct_of_best": len(n.good_scales),
                "diverged": n.diverged,
            }
            for net, n in self.nets.items()
        }


SWEEP = NetSweep("scale", "{:.3g}".format)  # jobs "plain/scale=0.0001", "bn/scale=0.0001", ...


def summarize(view: RunView) -> InitSummary:
    """The last row of every job and, per net, the scales that train."""
    finals = SWEEP.final_rows(view, view.config.scales)
    return InitSummary(finals, per_net(finals, _net_scales))


def _net_scales(done: list[tuple[float, dict]]) -> NetScales:
    """A net's best accuracy over its finished scales and the scales within 90% of it."""
    best = max(r["test_accuracy"] for _, r in done)
    return NetScales(
        best,
        [s for s, r in done if r["test_accuracy"] >= 0.9 * best],
        len(done),
        sum(bool(r["diverged"]) for _, r in done),
    )


PLOT = "accuracy_vs_init_scale.png"


def plot(view: RunView, s: InitSummary) -> None:
    """Final test and training accuracy against the scale (log), with and without BN."""
    c: InitConfig = view.config
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        done = finished(s.finals, net)
        for ax, column in zip(axes, ("test_accuracy", "train_accuracy")):
            plot_percent(ax, done, column, "o-", color=color, label=label)
    for ax, what in zip(axes, ("test", "training")):
        ax.set_xscale("log")
        style_axes(ax, "weight initialization scale (std)", f"final {what} accuracy (%)")
    fig.suptitle(f"{c.dataset}: {c.depth}x{c.hidden} ReLU MLP, Adam lr {c.lr:g}, {c.steps:,} steps")
    save(fig, view.plot_path(PLOT))


def render(s: InitSummary, c: InitConfig) -> str:
    """report.md: the setup, the accuracy table by scale and net, each net's trainable range."""
    rows = [
        [f"{scale:.2e}", *_cells(s, scale, "test_accuracy"), *_cells(s, scale, "train_accuracy")]
        for scale in c.scales
    ]
    lines = [
        *heading(
            "Initialization scale: final accuracy with and without BN",
            f"Dataset **{c.dataset}**; ReLU MLP with {c.depth} hidden layers of {c.hidden} "
            f"units, every Linear's weights from N(0, scale^2) (zero biases), {c.steps:,} "
            f"Adam steps (lr {c.lr:g}) on mini-batches of {c.batch_size}, seed {c.seed}; "
            "with BN, Linear (no bias) -> BatchNorm1d -> ReLU. The cs231n assignment's "
            "experiment (its 20 scales np.logspace(-4, 0, 20)).",
        ),
        *table(
            ["scale", "test without BN", "test with BN", "train without BN", "train with BN"], rows
        ),
        "",
        f"![accuracy vs init scale]({PLOT})",
        "",
    ]
    lines += [*per_net_lines(s.nets, _net_line), ""]
    return "\n".join(lines)


def _net_line(label: str, n: NetScales) -> str:
    good = n.good_scales
    return (
        f"- {label}: best test accuracy {pct(n.best_accuracy)}%; {len(good)} of "
        f"{n.finished} scales reach at least 90% of that"
        + (f" (scale {good[0]:.1e} .. {good[-1]:.1e})." if good else ".")
    )


def _cells(s: InitSummary, scale: float, column: str) -> list[str]:
    rows = [s.finals[net, scale] for net, _ in NETS]
    return [pct(row[column]) if row else "-" for row in rows]


@experiment("init", InitConfig, staged_report(summarize, plot, render))
def init_scale(run: Run) -> None:
    """Accuracy against the weight-initialization scale (cs231n's 20 scales), BN vs no BN."""
    c: InitConfig = run.config

    def options(data: Split, scale: float) -> dict[str, Any]:
        def train_accuracy(step: int, model: torch.nn.Module) -> dict:
            return {"train_accuracy": evaluate(model, data.train_x, data.train_y)["test_accuracy"]}

        return {
            "mlp_options": {"init_std": scale},
            "optimizer": lambda p: torch.optim.Adam(p, lr=c.lr),
            "extra_eval": train_accuracy,
        }

    SWEEP.train(run, c.scales, options)
