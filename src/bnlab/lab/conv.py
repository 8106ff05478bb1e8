"""Convolutions: a BN convnet at a 5x higher learning rate reaches the baseline's accuracy in
fewer steps.

Ioffe & Szegedy 2015, section 4.2 at lab scale: their BN-x5 Inception reached the baseline's best
accuracy (72.2%) in 2.1M steps where the baseline needed 31.0M (14x fewer); BN-Baseline (BN at the
baseline's rate) needed 13.3M. Here a small convnet (conv3x3-ReLU-maxpool twice, then a Linear; with
BN, a per-channel BatchNorm2d after each conv, whose bias it drops) is first trained without BN at
each rate of a small grid; the best rate's best test accuracy is the target. Then the BN net is
trained at that rate times each multiplier (1: BN-Baseline, 5: BN-x5). Reported: the steps each
takes to first reach the target, and the ratio to the baseline's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch
from torch import nn

from ..data import Split
from .common import Dataset, by_dataset, check_positive, images, load_data, train_as_configured
from .reports import fmt_lr, heading, pct, pyplot, save, staged_report, style_axes, table
from .runner import Run, RunView, experiment

PLOT = "conv_accuracy.png"


@dataclass
class ConvConfig:
    dataset: Dataset = (  # digits: 8x8 images as (N, 1, 8, 8); mnist: 28x28 (IDX files in data_dir)
        "digits"
    )
    data_dir: Optional[str] = None  # MNIST directory (selects mnist); None: $BNLAB_DATA_DIR
    baseline_lrs: tuple[float, ...] = (0.003, 0.01, 0.03)  # SGD rates tried on the unnormalized net
    bn_multipliers: tuple[float, ...] = (1.0, 5.0)  # BN net at the baseline's best rate times these
    steps: Optional[int] = None  # steps per net; None: 3,000 on digits, 6,000 on mnist
    eval_every: Optional[int] = None  # test-set evaluations every so many steps; None: steps / 60
    batch_size: int = 32  # examples per mini-batch
    momentum: float = 0.9  # SGD momentum, every net
    channels: tuple[int, ...] = (16, 32)  # output channels of the two conv layers
    seed: int = 0  # initialization and mini-batch order (the same for every net)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "ConvConfig":
        steps = by_dataset(self.steps, self.dataset, 3000, 6000)
        c = replace(
            self,
            steps=steps,
            eval_every=self.eval_every or max(1, steps // 60),
            baseline_lrs=tuple(sorted(self.baseline_lrs)),
        )
        check_positive(c, "steps", "eval_every", "batch_size")
        if (
            not c.baseline_lrs
            or min(c.baseline_lrs) <= 0
            or not c.bn_multipliers
            or min(c.bn_multipliers) <= 0
        ):
            raise ValueError("baseline_lrs and bn_multipliers must be positive")
        if len(c.channels) != 2 or min(c.channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {c.channels}")
        return c


class ConvNet(nn.Module):
    """conv3x3 -> [BN2d] -> ReLU -> maxpool2, twice, then a Linear (a lazy one sized by the
    image)."""

    def __init__(
        self, side: int, channels: tuple[int, int], classes: int, batch_norm: bool
    ) -> None:
        from ..nn import BatchNorm2d

        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=not batch_norm),
            BatchNorm2d(c1) if batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=not batch_norm),
            BatchNorm2d(c2) if batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, side, side)
        return self.head(self.features(x).flatten(1))


def _curve(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["test_accuracy"]) for r in rows]


def _first_at(curve: list[tuple[int, float]], target: float) -> Optional[int]:
    return next((s for s, a in curve if a >= target), None)


def baseline_target(
    view_or_run, c: ConvConfig
) -> tuple[Optional[float], Optional[float], Optional[int]]:
    """(best baseline rate, its best test accuracy, the first step it got there)."""
    best = None
    for lr in c.baseline_lrs:
        rows = view_or_run.job_rows(f"plain/lr={fmt_lr(lr)}")
        if not rows:
            continue
        acc = max(a for _, a in _curve(rows))
        if best is None or acc > best[1]:
            best = (lr, acc, _first_at(_curve(rows), acc))
    return best if best is not None else (None, None, None)


@dataclass
class BnAtRate:
    """The BN net at the baseline's best rate times one multiplier."""

    lr: float
    steps_to_target: Optional[int]  # first evaluated step at the baseline's best (None: never)
    speedup: Optional[float]  # the baseline's steps to its best / this net's (None: never reached)
    best: float  # this net's best test accuracy


@dataclass
class ConvSummary:
    """Every number the convolution report quotes, computed once from the run's rows."""

    baseline_lr: Optional[float]  # the baseline's best rate (None: no baseline finished)
    target: Optional[float]  # its best test accuracy: the target
    baseline_steps: Optional[int]  # the first step it reached the target
    bn: dict[float, BnAtRate]  # multiplier -> the BN net at that rate, for the nets with rows

    def headline(self) -> dict[str, Any]:
        """summary.json: the baseline's target, then each BN net's steps to it and speed-up."""
        if self.target is None:
            return {}
        out: dict[str, Any] = {
            "baseline_lr": self.baseline_lr,
            "target": self.target,
            "baseline_steps": self.baseline_steps,
        }
        out.update({f"bn_x{m:g}": asdict(bn) for m, bn in self.bn.items()})
        return out


def summarize(view: RunView) -> ConvSummary:
    """The baseline's best rate and accuracy, and the steps each BN net takes to reach it."""
    c: ConvConfig = view.config
    best_lr, target, base_steps = baseline_target(view, c)
    bn = {}
    if target is not None:
        for m, rows in _bn_rows(view, c).items():
            if rows:
                reached = _first_at(_curve(rows), target)
                bn[m] = BnAtRate(
                    rows[0]["lr"],
                    reached,
                    base_steps / reached if reached else None,
                    max(a for _, a in _curve(rows)),
                )
    return ConvSummary(best_lr, target, base_steps, bn)


def _bn_rows(view: RunView, c: ConvConfig) -> dict[float, list[dict]]:
    return {m: view.job_rows(f"bn/x{m:g}") for m in c.bn_multipliers}


def plot(view: RunView, s: ConvSummary) -> None:
    """Test accuracy against the step: the baseline at every rate (its best solid), the BN nets,
    and the target as a dashed line."""
    c: ConvConfig = view.config
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for lr in c.baseline_lrs:
        rows = view.job_rows(f"plain/lr={fmt_lr(lr)}")
        best = lr == s.baseline_lr
        if rows:
            ax.plot(
                *zip(*_curve(rows)),
                "-" if best else ":",
                color="C0",
                alpha=1 if best else 0.5,
                label=f"no BN, lr {fmt_lr(lr)}" + (" (best)" if best else ""),
            )
    for (m, rows), color in zip(_bn_rows(view, c).items(), ("C2", "C1", "C3", "C4")):
        if rows:
            ax.plot(
                *zip(*_curve(rows)), color=color, label=f"BN, lr {fmt_lr(rows[0]['lr'])} (x{m:g})"
            )
    if s.target is not None:
        ax.axhline(s.target, color="gray", lw=0.8, ls="--")
    lowest = min([a for key in view.jobs() for _, a in _curve(view.job_rows(key))] or [0])
    ax.set_ylim(max(lowest, (s.target or 1) - 0.15), 1.0)
    ax.set_title(f"{c.dataset}: small convnet, SGD momentum {c.momentum:g}, batch {c.batch_size}")
    style_axes(ax, "step", "test accuracy", fontsize=8)
    save(fig, view.plot_path(PLOT))


def render(s: ConvSummary, c: ConvConfig) -> str:
    """report.md: the setup, then the baseline's target and the BN nets' steps to it."""
    lines = heading(
        "Convolutions: steps to the baseline's best accuracy, BN at a higher rate",
        f"Dataset **{c.dataset}** as (N, 1, side, side) images; convnet "
        f"conv3x3({c.channels[0]}) -> ReLU -> maxpool2 -> conv3x3({c.channels[1]}) -> ReLU -> "
        "maxpool2 -> Linear, with BN a per-channel BatchNorm2d after each conv; SGD (momentum "
        f"{c.momentum:g}), batch {c.batch_size}, {c.steps:,} steps per net, test accuracy every "
        f"{c.eval_every:,} steps, seed {c.seed}. The baseline (no BN) is trained at each rate of "
        f"{', '.join(map(fmt_lr, c.baseline_lrs))}; its best test accuracy over all evaluations "
        "is the target.",
    )
    if s.target is None:
        return "\n".join(lines + ["No baseline finished yet.", ""])
    rows = [
        ["no BN", fmt_lr(s.baseline_lr), f"{s.baseline_steps:,}", "1.0x (reference)", pct(s.target)]
    ]
    rows += [
        [
            f"BN x{m:g}",
            fmt_lr(bn.lr),
            f"{bn.steps_to_target:,}" if bn.steps_to_target else "never",
            f"{bn.speedup:.1f}x fewer steps" if bn.speedup else "-",
            pct(bn.best),
        ]
        for m, bn in s.bn.items()
    ]
    lines += [
        f"Baseline's best: {pct(s.target)}% at lr {fmt_lr(s.baseline_lr)}, first reached "
        f"at step {s.baseline_steps:,}.",
        "",
        *table(["net", "lr", f"steps to {pct(s.target)}%", "speed-up", "best accuracy"], rows),
        "",
        f"![accuracy vs steps]({PLOT})",
        "",
        "The paper's ImageNet numbers for comparison: Inception reached 72.2% in 31.0M "
        "steps, BN-Baseline in 13.3M (2.3x fewer), BN-x5 in 2.1M (14x fewer).",
        "",
    ]
    return "\n".join(lines)


@experiment("conv", ConvConfig, staged_report(summarize, plot, render))
def conv(run: Run) -> None:
    """A small convnet with BatchNorm2d at 5x the rate: steps to the baseline's best accuracy."""
    c: ConvConfig = run.config
    flat = load_data(c.dataset, c.data_dir)
    data = Split(images(flat.train_x), flat.train_y, images(flat.test_x), flat.test_y)
    side = data.train_x.shape[-1]
    run.total_jobs = len(c.baseline_lrs) + len(c.bn_multipliers)

    def job(key: str, lr: float, batch_norm: bool, tags: dict) -> None:
        train_as_configured(
            run,
            key,
            data,
            c,
            build=lambda: ConvNet(side, c.channels, data.num_classes, batch_norm),
            optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=c.momentum),
            tags=tags,
        )

    for lr in c.baseline_lrs:
        job(f"plain/lr={fmt_lr(lr)}", lr, False, {"net": "plain", "lr": lr})
    best_lr, _, _ = baseline_target(run, c)
    for m in c.bn_multipliers:
        job(f"bn/x{m:g}", best_lr * m, True, {"net": "bn", "lr": best_lr * m, "multiplier": m})
