"""Learning rate: accuracy after a fixed budget against the learning rate, with and without BN.

Ioffe & Szegedy 2015, section 3.3: BN makes training resilient to the parameter scale, so higher
learning rates neither blow up nor vanish the gradients. A ReLU MLP (He init) is trained with plain
SGD for the same number of steps at every rate of a log grid, once as is and once with BN after
every hidden Linear. Where the plain net diverges (non-finite loss: recorded as such, the job ends
there) the BN net still trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Optional

import torch

from ..data import Split
from .common import (
    NETS,
    NetSweep,
    ascending_positive,
    check_positive,
    finished,
    per_net,
    per_net_lines,
)
from .datasets import DatasetConfig, by_dataset
from .reports import (
    fmt_lr,
    heading,
    pct,
    plot_percent,
    pyplot,
    save,
    staged_report,
    style_axes,
    table,
)
from .runner import Run, RunView, experiment


@dataclass
class LrConfig(DatasetConfig):
    lrs: tuple[float, ...] = (  # the log grid of SGD learning rates
        0.003,
        0.01,
        0.03,
        0.1,
        0.3,
        1.0,
        3.0,
        10.0,
    )
    steps: Optional[int] = None  # budget per net and rate; None: 1,000 on digits, 3,000 on mnist
    batch_size: int = 60  # examples per mini-batch
    hidden: int = 100  # units per hidden layer
    depth: int = 3  # hidden layers
    activation: Literal["relu", "sigmoid", "tanh"] = (  # nonlinearity (He init if relu, else LeCun)
        "relu"
    )
    momentum: float = 0.0  # SGD momentum (0: plain SGD)
    seed: int = 0  # initialization and mini-batch order (the same for every job)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "LrConfig":
        c = replace(self, steps=by_dataset(self.steps, self.dataset, 1000, 3000))
        check_positive(c, "steps", "batch_size", "hidden", "depth")
        c = replace(c, lrs=ascending_positive("lrs", c.lrs))
        if not 0 <= c.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {c.momentum}")
        return c


@dataclass
class NetBest:
    """One net's best rate in the sweep and the rates at which it diverged."""

    best_lr: float
    best_accuracy: float
    diverged_lrs: list[float]


@dataclass
class LrSummary:
    """Every number the learning-rate report quotes, computed once from the run's rows."""

    finals: dict[tuple[str, float], Optional[dict]]  # (net, lr) -> last row (None: not run)
    best: dict[str, NetBest]  # the nets with at least one finished rate
    rescued: dict[float, float]  # lr -> BN's accuracy, where the plain net diverged and BN did not
    good_lrs: dict[str, list[float]]  # net -> the rates (ascending) at >= 90% without diverging

    def headline(self) -> dict[str, Any]:
        """summary.json: each net's best rate, then BN's accuracy where the plain net diverged."""
        out: dict[str, Any] = {net: asdict(best) for net, best in self.best.items()}
        out["bn_trains_where_plain_diverges"] = {fmt_lr(lr): a for lr, a in self.rescued.items()}
        return out


SWEEP = NetSweep("lr", fmt_lr)  # jobs "plain/lr=0.1", "bn/lr=0.1", ...


def summarize(view: RunView) -> LrSummary:
    """The last row of every job, each net's best rate, where BN trains and the plain net not."""
    c: LrConfig = view.config
    finals = SWEEP.final_rows(view, c.lrs)
    best = per_net(finals, _best_rate)
    both = [lr for lr in c.lrs if finals["plain", lr] is not None and finals["bn", lr] is not None]
    rescued = {
        lr: finals["bn", lr]["test_accuracy"]
        for lr in both
        if finals["plain", lr]["diverged"] and not finals["bn", lr]["diverged"]
    }
    good = {
        net: [
            lr
            for lr in c.lrs
            if finals[net, lr] is not None
            and not finals[net, lr]["diverged"]
            and finals[net, lr]["test_accuracy"] >= 0.9
        ]
        for net, _ in NETS
    }
    return LrSummary(finals, best, rescued, good)


def _best_rate(done: list[tuple[float, dict]]) -> NetBest:
    """The rate of the highest final accuracy (the lowest such rate on a tie)."""
    best_lr, row = max(done, key=lambda p: (p[1]["test_accuracy"], -p[0]))
    return NetBest(best_lr, row["test_accuracy"], [lr for lr, r in done if r["diverged"]])


def render(s: LrSummary, c: LrConfig) -> str:
    """report.md: the setup, the accuracy table by rate and net, and the findings."""
    lines = [
        *heading(
            "Learning rate: accuracy after a fixed budget, with and without BN",
            f"Dataset **{c.dataset}**; MLP with {c.depth} hidden layers of {c.hidden} "
            f"{c.activation} units (He/LeCun normal init; with BN, Linear without bias -> "
            f"BatchNorm1d -> {c.activation}), {c.steps:,} steps of SGD (momentum "
            f"{c.momentum:g}) on mini-batches of {c.batch_size} at each rate, seed {c.seed}. "
            'A non-finite training loss ends a job there ("diverged"); its accuracy is '
            "then that of the diverged weights.",
        ),
        *table(
            ["lr", *[label for _, label in NETS]],
            [[fmt_lr(lr), *[_cell(s.finals[net, lr]) for net, _ in NETS]] for lr in c.lrs],
        ),
        "",
        f"![accuracy vs learning rate]({PLOT})",
        "",
    ]
    lines += per_net_lines(s.best, _best_line)
    if s.rescued:
        lines.append(
            "- Where the plain net diverged, BN trained to "
            + ", ".join(f"{pct(a)}% (lr {fmt_lr(lr)})" for lr, a in s.rescued.items())
            + "."
        )
    for net, label in NETS:
        good = s.good_lrs[net]
        if good:
            lines.append(
                f"- {label}: >= 90% test accuracy at {len(good)} of {len(c.lrs)} "
                f"rates (lr {fmt_lr(good[0])} .. {fmt_lr(good[-1])})."
            )
    lines.append("")
    return "\n".join(lines)


def _best_line(label: str, b: NetBest) -> str:
    return f"- {label}: best {pct(b.best_accuracy)}% at lr {fmt_lr(b.best_lr)}; " + (
        f"diverged at lr {', '.join(map(fmt_lr, b.diverged_lrs))}."
        if b.diverged_lrs
        else "never diverged."
    )


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    if row["diverged"]:
        return f"{pct(row['test_accuracy'])} (diverged at step {row['step']:,})"
    return pct(row["test_accuracy"])


PLOT = "accuracy_vs_lr.png"


def plot(view: RunView, s: LrSummary) -> None:
    """Test accuracy against the rate (log), one curve per net; diverged jobs crossed out."""
    c: LrConfig = view.config
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        points = finished(s.finals, net)
        plot_percent(ax, points, "test_accuracy", "o-", color=color, label=label)
        bad = [(lr, r) for lr, r in points if r["diverged"]]
        if bad:
            crosses = {"color": "red", "markersize": 10, "mew": 2, "label": f"{label}: diverged"}
            plot_percent(ax, bad, "test_accuracy", "x", **crosses)
    ax.set_xscale("log")
    ax.set_title(f"{c.dataset}: {c.depth}x{c.hidden} {c.activation} MLP, SGD, batch {c.batch_size}")
    style_axes(ax, "learning rate", f"test accuracy after {c.steps:,} steps (%)")
    save(fig, view.plot_path(PLOT))


@experiment("lr", LrConfig, staged_report(summarize, plot, render))
def lr_sweep(run: Run) -> None:
    """Accuracy after a fixed budget against the learning rate (log grid), BN vs no BN."""
    c: LrConfig = run.config

    def options(data: Split, lr: float) -> dict[str, Any]:
        return {
            "mlp_options": {"activation": c.activation},
            "optimizer": lambda p: torch.optim.SGD(p, lr=lr, momentum=c.momentum),
        }

    SWEEP.train(run, c.lrs, options)
