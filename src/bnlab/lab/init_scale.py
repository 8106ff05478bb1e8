"""Initialization scale: final accuracy against the weight-initialization scale, with and without BN.

The cs231n batch-normalization assignment's experiment: a deep ReLU MLP whose weights are drawn from
N(0, scale^2) for 20 scales np.logspace(-4, 0, 20), trained with Adam; without BN only a narrow band
of scales trains (too small: the signal vanishes through the layers; too large: it explodes), with
BN almost every scale does, since BN(W u) = BN(a W u) removes the scale of each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from .common import Dataset, by_dataset, check_positive, classifier_job, evaluate, load_data, mlp, pct, pyplot, save, table
from .runner import Report, Run, RunView, experiment

NETS = (("plain", "without BN"), ("bn", "with BN"))


@dataclass
class InitConfig:
    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR
    scales: tuple[float, ...] = tuple(float(s) for s in np.logspace(-4, 0, 20))  # weight std of every Linear: cs231n's np.logspace(-4, 0, 20)
    steps: Optional[int] = None  # Adam steps per net and scale; None: 400 on digits, 1,000 on mnist
    batch_size: int = 50  # cs231n's
    lr: float = 1e-3  # Adam (cs231n's setting)
    hidden: int = 50  # units per hidden layer (cs231n: 50)
    depth: int = 7  # hidden layers (cs231n: an 8-layer net, 7 hidden layers)
    seed: int = 0  # initialization and mini-batch order (the same for every job)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "InitConfig":
        c = replace(self, steps=by_dataset(self.steps, self.dataset, 400, 1000), scales=tuple(sorted(self.scales)))
        check_positive(c, "steps", "batch_size", "lr", "hidden", "depth")
        if not c.scales or min(c.scales) <= 0:
            raise ValueError(f"scales must be positive, got {c.scales}")
        return c


def _key(net: str, scale: float) -> str:
    return f"{net}/scale={scale:.3g}"


def _report(view: RunView) -> Report:
    c: InitConfig = view.config
    last = {(net, s): view.last(_key(net, s)) for net, _ in NETS for s in c.scales}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        pts = [(s, last[net, s]) for s in c.scales if last[net, s] is not None]
        axes[0].plot([s for s, _ in pts], [100 * r["test_accuracy"] for _, r in pts], "o-", color=color, label=label)
        axes[1].plot([s for s, _ in pts], [100 * r["train_accuracy"] for _, r in pts], "o-", color=color, label=label)
    for ax, what in zip(axes, ("test", "training")):
        ax.set_xscale("log")
        ax.set_xlabel("weight initialization scale (std)")
        ax.set_ylabel(f"final {what} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{c.dataset}: {c.depth}x{c.hidden} ReLU MLP, Adam lr {c.lr:g}, {c.steps:,} steps")
    save(fig, view.plot_path("accuracy_vs_init_scale.png"))

    lines = [
        "# Initialization scale: final accuracy with and without BN", "",
        f"Dataset **{c.dataset}**; ReLU MLP with {c.depth} hidden layers of {c.hidden} units, every "
        f"Linear's weights from N(0, scale^2) (zero biases), {c.steps:,} Adam steps (lr {c.lr:g}) on "
        f"mini-batches of {c.batch_size}, seed {c.seed}; with BN, Linear (no bias) -> BatchNorm1d -> ReLU. "
        "The cs231n assignment's experiment (its 20 scales np.logspace(-4, 0, 20)).", "",
        *table(["scale", "test without BN", "test with BN", "train without BN", "train with BN"],
               [[f"{s:.2e}", *[pct(last[n, s]["test_accuracy"]) if last[n, s] else "-" for n, _ in NETS],
                 *[pct(last[n, s]["train_accuracy"]) if last[n, s] else "-" for n, _ in NETS]] for s in c.scales]),
        "", "![accuracy vs init scale](accuracy_vs_init_scale.png)", "",
    ]
    summary: dict = {}
    for net, label in NETS:
        done = [(s, last[net, s]) for s in c.scales if last[net, s] is not None]
        if not done:
            continue
        best = max(r["test_accuracy"] for _, r in done)
        good = [s for s, r in done if r["test_accuracy"] >= 0.9 * best]
        summary[net] = {"best_accuracy": best, "scales_within_90pct_of_best": len(good),
                        "diverged": sum(bool(r["diverged"]) for _, r in done)}
        lines.append(f"- {label}: best test accuracy {pct(best)}%; {len(good)} of {len(done)} scales reach "
                     f"at least 90% of that" + (f" (scale {min(good):.1e} .. {max(good):.1e})." if good else "."))
    lines.append("")
    return Report("\n".join(lines), summary)


@experiment("init", InitConfig, _report)
def init_scale(run: Run) -> None:
    """Accuracy against the weight-initialization scale (cs231n's 20 scales), BN vs no BN."""
    c: InitConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(c.scales) * len(NETS)
    for scale in c.scales:
        for net, _ in NETS:
            classifier_job(
                run, _key(net, scale),
                build=lambda net=net, scale=scale: mlp(data.num_features, data.num_classes, c.hidden, c.depth,
                                                       norm="bn" if net == "bn" else "none", init_std=scale),
                optimizer=lambda p: torch.optim.Adam(p, lr=c.lr),
                x=data.train_x, y=data.train_y, test_x=data.test_x, test_y=data.test_y,
                steps=c.steps, batch_size=c.batch_size, seed=c.seed, tags={"net": net, "scale": scale},
                extra_eval=lambda i, model: {"train_accuracy": evaluate(model, data.train_x, data.train_y)["test_accuracy"]},
            )
