"""Convolutions: a BN convnet at a 5x higher learning rate reaches the baseline's accuracy in fewer steps.

Ioffe & Szegedy 2015, section 4.2 at lab scale: their BN-x5 Inception reached the baseline's best
accuracy (72.2%) in 2.1M steps where the baseline needed 31.0M (14x fewer); BN-Baseline (BN at the
baseline's rate) needed 13.3M. Here a small convnet (conv3x3-ReLU-maxpool twice, then a Linear; with
BN, a per-channel BatchNorm2d after each conv, whose bias it drops) is first trained without BN at
each rate of a small grid; the best rate's best test accuracy is the target. Then the BN net is
trained at that rate times each multiplier (1: BN-Baseline, 5: BN-x5). Reported: the steps each
takes to first reach the target, and the ratio to the baseline's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from .common import Dataset, by_dataset, check_positive, classifier_job, fmt_lr, images, load_data, pct, pyplot, save, table
from .runner import Report, Run, RunView, experiment


@dataclass
class ConvConfig:
    dataset: Dataset = "digits"  # digits: 8x8 images as (N, 1, 8, 8); mnist: 28x28 (IDX files in data_dir)
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR
    baseline_lrs: tuple[float, ...] = (0.003, 0.01, 0.03)  # SGD rates tried for the unnormalized net
    bn_multipliers: tuple[float, ...] = (1.0, 5.0)  # BN net at the baseline's best rate times these (the paper's BN-Baseline, BN-x5)
    steps: Optional[int] = None  # steps per net; None: 3,000 on digits, 6,000 on mnist
    eval_every: Optional[int] = None  # test-set evaluations every so many steps; None: steps / 60
    batch_size: int = 32  # examples per mini-batch
    momentum: float = 0.9  # SGD momentum, every net
    channels: tuple[int, ...] = (16, 32)  # output channels of the two conv layers
    seed: int = 0  # initialization and mini-batch order (the same for every net)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "ConvConfig":
        steps = by_dataset(self.steps, self.dataset, 3000, 6000)
        c = replace(self, steps=steps, eval_every=self.eval_every or max(1, steps // 60),
                    baseline_lrs=tuple(sorted(self.baseline_lrs)))
        check_positive(c, "steps", "eval_every", "batch_size")
        if not c.baseline_lrs or min(c.baseline_lrs) <= 0 or not c.bn_multipliers or min(c.bn_multipliers) <= 0:
            raise ValueError("baseline_lrs and bn_multipliers must be positive")
        if len(c.channels) != 2 or min(c.channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {c.channels}")
        return c


class ConvNet(nn.Module):
    """conv3x3 -> [BN2d] -> ReLU -> maxpool2, twice, then a Linear (a lazy one sized by the image)."""

    def __init__(self, side: int, channels: tuple[int, int], classes: int, batch_norm: bool) -> None:
        from ..nn import BatchNorm2d

        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=not batch_norm),
            BatchNorm2d(c1) if batch_norm else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=not batch_norm),
            BatchNorm2d(c2) if batch_norm else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, side, side)
        return self.head(self.features(x).flatten(1))


def _curve(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["test_accuracy"]) for r in rows]


def _first_at(curve: list[tuple[int, float]], target: float) -> Optional[int]:
    return next((s for s, a in curve if a >= target), None)


def baseline_target(view_or_run, c: ConvConfig) -> tuple[Optional[float], Optional[float], Optional[int]]:
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


def _report(view: RunView) -> Report:
    c: ConvConfig = view.config
    best_lr, target, base_steps = baseline_target(view, c)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for lr in c.baseline_lrs:
        rows = view.job_rows(f"plain/lr={fmt_lr(lr)}")
        if rows:
            ax.plot(*zip(*_curve(rows)), "-" if lr == best_lr else ":", color="C0", alpha=1 if lr == best_lr else 0.5,
                    label=f"no BN, lr {fmt_lr(lr)}" + (" (best)" if lr == best_lr else ""))
    bn_rows = {m: view.job_rows(f"bn/x{m:g}") for m in c.bn_multipliers}
    for (m, rows), color in zip(bn_rows.items(), ("C2", "C1", "C3", "C4")):
        if rows:
            ax.plot(*zip(*_curve(rows)), color=color, label=f"BN, lr {fmt_lr(rows[0]['lr'])} (x{m:g})")
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    lo = min([a for rows in [view.job_rows(k) for k in view.jobs()] for _, a in _curve(rows)] or [0])
    ax.set_ylim(max(lo, (target or 1) - 0.15), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{c.dataset}: small convnet, SGD momentum {c.momentum:g}, batch {c.batch_size}")
    save(fig, view.plot_path("conv_accuracy.png"))

    lines = [
        "# Convolutions: steps to the baseline's best accuracy, BN at a higher rate", "",
        f"Dataset **{c.dataset}** as (N, 1, side, side) images; convnet conv3x3({c.channels[0]}) -> ReLU -> maxpool2 "
        f"-> conv3x3({c.channels[1]}) -> ReLU -> maxpool2 -> Linear, with BN a per-channel BatchNorm2d after each "
        f"conv; SGD (momentum {c.momentum:g}), batch {c.batch_size}, {c.steps:,} steps per net, test accuracy every "
        f"{c.eval_every:,} steps, seed {c.seed}. The baseline (no BN) is trained at each rate of "
        f"{', '.join(map(fmt_lr, c.baseline_lrs))}; its best test accuracy over all evaluations is the target.", "",
    ]
    summary: dict = {}
    if target is None:
        return Report("\n".join(lines + ["No baseline finished yet.", ""]), summary)
    summary.update(baseline_lr=best_lr, target=target, baseline_steps=base_steps)
    rows_t = [["no BN", fmt_lr(best_lr), f"{base_steps:,}", "1.0x (reference)", pct(target)]]
    for m, rows in bn_rows.items():
        if not rows:
            continue
        reached = _first_at(_curve(rows), target)
        best = max(a for _, a in _curve(rows))
        ratio = base_steps / reached if reached else None
        summary[f"bn_x{m:g}"] = {"lr": rows[0]["lr"], "steps_to_target": reached, "speedup": ratio, "best": best}
        rows_t.append([f"BN x{m:g}", fmt_lr(rows[0]["lr"]), f"{reached:,}" if reached else "never",
                       f"{ratio:.1f}x fewer steps" if ratio else "-", pct(best)])
    lines += [f"Baseline's best: {pct(target)}% at lr {fmt_lr(best_lr)}, first reached at step {base_steps:,}.", "",
              *table(["net", "lr", f"steps to {pct(target)}%", "speed-up", "best accuracy"], rows_t),
              "", "![accuracy vs steps](conv_accuracy.png)", "",
              "The paper's ImageNet numbers for comparison: Inception reached 72.2% in 31.0M steps, "
              "BN-Baseline in 13.3M (2.3x fewer), BN-x5 in 2.1M (14x fewer).", ""]
    return Report("\n".join(lines), summary)


@experiment("conv", ConvConfig, _report)
def conv(run: Run) -> None:
    """A small convnet with BatchNorm2d at 5x the rate: steps to the baseline's best accuracy."""
    c: ConvConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    x, test_x = images(data.train_x), images(data.test_x)
    side = x.shape[-1]
    run.total_jobs = len(c.baseline_lrs) + len(c.bn_multipliers)

    def job(key: str, lr: float, batch_norm: bool, tags: dict) -> None:
        classifier_job(
            run, key, build=lambda: ConvNet(side, c.channels, data.num_classes, batch_norm),
            optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=c.momentum),
            x=x, y=data.train_y, test_x=test_x, test_y=data.test_y, steps=c.steps,
            batch_size=c.batch_size, seed=c.seed, eval_every=c.eval_every, tags=tags,
        )

    for lr in c.baseline_lrs:
        job(f"plain/lr={fmt_lr(lr)}", lr, False, {"net": "plain", "lr": lr})
    best_lr, _, _ = baseline_target(run, c)
    for m in c.bn_multipliers:
        job(f"bn/x{m:g}", best_lr * m, True, {"net": "bn", "lr": best_lr * m, "multiplier": m})
