"""Batch size: batch norm against layer norm against no normalization, across batch sizes.

BN's statistics come from the mini-batch, so they get noisy (and unlike the population statistics
used at test time) as the batch shrinks; layer norm's come from each example alone, identical in
training and inference, so it does not care (Ba et al. 2016; the cs231n assignment's batch-size
experiment). A ReLU MLP is trained with Adam for the same number of epochs at each batch size
(with a floor on the number of steps so that large batches are not simply under-trained).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .common import Dataset, check_positive, classifier_job, load_data, mlp, pct, pyplot, save, table
from .runner import Report, Run, RunView, experiment

NORMS = (("none", "no normalization"), ("bn", "BatchNorm"), ("ln", "LayerNorm"))


@dataclass
class BatchSizeConfig:
    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # examples per mini-batch (>= 2: BN needs two)
    norms: tuple[str, ...] = ("none", "bn", "ln")  # none, bn (BatchNorm1d), ln (LayerNorm)
    epochs: Optional[float] = None  # passes over the training set at every batch size; None: 6 on digits, 1 on mnist
    min_steps: int = 200  # at least this many steps (large batches)
    lr: float = 1e-3  # Adam, every batch size (cs231n's setting)
    hidden: int = 100  # units per hidden layer
    depth: int = 3  # hidden layers (ReLU)
    seed: int = 0  # initialization and mini-batch order
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "BatchSizeConfig":
        c = replace(self, epochs=self.epochs if self.epochs is not None else (1.0 if self.dataset == "mnist" else 6.0))
        check_positive(c, "epochs", "lr", "hidden", "depth")
        if not c.batch_sizes or min(c.batch_sizes) < 2:
            raise ValueError(f"batch sizes must be >= 2 (BN needs more than one value per feature), got {c.batch_sizes}")
        bad = [n for n in c.norms if n not in dict(NORMS)]
        if bad or not c.norms:
            raise ValueError(f"unknown norm(s) {bad}; expected some of {[n for n, _ in NORMS]}")
        return c

    def steps(self, batch_size: int, n: int) -> int:
        return max(self.min_steps, round(self.epochs * n / batch_size))


def _key(norm: str, b: int) -> str:
    return f"{norm}/b={b}"


def _report(view: RunView) -> Report:
    c: BatchSizeConfig = view.config
    labels = dict(NORMS)
    last = {(n, b): view.last(_key(n, b)) for n in c.norms for b in c.batch_sizes}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n in c.norms:
        pts = [(b, last[n, b]) for b in c.batch_sizes if last[n, b] is not None]
        ax.plot([b for b, _ in pts], [100 * r["test_accuracy"] for _, r in pts], "o-", label=labels[n])
    ax.set_xscale("log", base=2)
    ax.set_xticks(c.batch_sizes, [str(b) for b in c.batch_sizes])
    ax.set_xlabel("examples per batch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{c.dataset}: {c.depth}x{c.hidden} ReLU MLP, Adam, {c.epochs:g} epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, view.plot_path("accuracy_vs_batch_size.png"))
    lines = [
        "# Batch size: BN vs layer norm vs no normalization", "",
        f"Dataset **{c.dataset}**; ReLU MLP with {c.depth} hidden layers of {c.hidden} units, the "
        f"normalization after each hidden Linear; Adam (lr {c.lr:g}) for {c.epochs:g} epochs at each "
        f"batch size (at least {c.min_steps} steps), seed {c.seed}. Test accuracy (%) at the end, in eval "
        "mode (BN uses its running statistics).", "",
        *table(["normalization", *map(str, c.batch_sizes)],
               [[labels[n], *[pct(last[n, b]["test_accuracy"]) if last[n, b] else "-" for b in c.batch_sizes]]
                for n in c.norms]),
        "", "![accuracy vs batch size](accuracy_vs_batch_size.png)", "",
    ]
    summary: dict = {}
    small, large = min(c.batch_sizes), max(c.batch_sizes)
    for n in c.norms:
        if last[n, small] and last[n, large]:
            a, b = last[n, small]["test_accuracy"], last[n, large]["test_accuracy"]
            values = [last[n, s]["test_accuracy"] for s in c.batch_sizes if last[n, s]]
            summary[n] = {"smallest_batch": a, "largest_batch": b, "range": max(values) - min(values)}
            lines.append(f"- {labels[n]}: {pct(a)}% at batch {small}, {pct(b)}% at batch {large}; "
                         f"max - min over batch sizes {100 * (max(values) - min(values)):.1f} points.")
    lines.append("")
    return Report("\n".join(lines), summary)


@experiment("batch-size", BatchSizeConfig, _report)
def batch_size(run: Run) -> None:
    """BN vs layer norm vs no normalization across batch sizes 2..256."""
    c: BatchSizeConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(c.norms) * len(c.batch_sizes)
    for b in c.batch_sizes:
        for norm in c.norms:
            classifier_job(
                run, _key(norm, b),
                build=lambda norm=norm: mlp(data.num_features, data.num_classes, c.hidden, c.depth, norm=norm),
                optimizer=lambda p: torch.optim.Adam(p, lr=c.lr),
                x=data.train_x, y=data.train_y, test_x=data.test_x, test_y=data.test_y,
                steps=c.steps(b, len(data.train_y)), batch_size=b, seed=c.seed,
                tags={"norm": norm, "batch_size": b},
            )
