"""Learning rate: accuracy after a fixed budget against the learning rate, with and without BN.

Ioffe & Szegedy 2015, section 3.3: BN makes training resilient to the parameter scale, so higher
learning rates neither blow up nor vanish the gradients. A ReLU MLP (He init) is trained with plain
SGD for the same number of steps at every rate of a log grid, once as is and once with BN after
every hidden Linear. Where the plain net diverges (non-finite loss: recorded as such, the job ends
there) the BN net still trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch

from .common import Dataset, by_dataset, check_positive, classifier_job, fmt_lr, load_data, mlp, pct, pyplot, save, table
from .runner import Report, Run, RunView, experiment

NETS = (("plain", "without BN"), ("bn", "with BN"))


@dataclass
class LrConfig:
    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # the log grid of SGD learning rates
    steps: Optional[int] = None  # the budget per net and rate; None: 1,000 on digits, 3,000 on mnist
    batch_size: int = 60  # examples per mini-batch
    hidden: int = 100  # units per hidden layer
    depth: int = 3  # hidden layers
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"  # hidden nonlinearity (He init for relu, LeCun otherwise)
    momentum: float = 0.0  # SGD momentum (0: plain SGD)
    seed: int = 0  # initialization and mini-batch order (the same for every job)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "LrConfig":
        c = replace(self, steps=by_dataset(self.steps, self.dataset, 1000, 3000),
                    lrs=tuple(sorted(self.lrs)))
        check_positive(c, "steps", "batch_size", "hidden", "depth")
        if not c.lrs or min(c.lrs) <= 0:
            raise ValueError(f"lrs must be positive, got {c.lrs}")
        if not 0 <= c.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {c.momentum}")
        return c


def _key(net: str, lr: float) -> str:
    return f"{net}/lr={fmt_lr(lr)}"


def _report(view: RunView) -> Report:
    c: LrConfig = view.config
    last = {(net, lr): view.last(_key(net, lr)) for net, _ in NETS for lr in c.lrs}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        points = [(lr, last[net, lr]) for lr in c.lrs if last[net, lr] is not None]
        ax.plot([lr for lr, _ in points], [100 * r["test_accuracy"] for _, r in points], "o-",
                color=color, label=label)
        bad = [(lr, r) for lr, r in points if r["diverged"]]
        if bad:
            ax.plot([lr for lr, _ in bad], [100 * r["test_accuracy"] for _, r in bad], "x", color="red",
                    markersize=10, mew=2, label=f"{label}: diverged")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"test accuracy after {c.steps:,} steps (%)")
    ax.set_title(f"{c.dataset}: {c.depth}x{c.hidden} {c.activation} MLP, SGD, batch {c.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, view.plot_path("accuracy_vs_lr.png"))

    def cell(r):
        if r is None:
            return "-"
        return f"{pct(r['test_accuracy'])} (diverged at step {r['step']:,})" if r["diverged"] else pct(r["test_accuracy"])

    lines = [
        "# Learning rate: accuracy after a fixed budget, with and without BN", "",
        f"Dataset **{c.dataset}**; MLP with {c.depth} hidden layers of {c.hidden} {c.activation} units "
        f"(He/LeCun normal init; with BN, Linear without bias -> BatchNorm1d -> {c.activation}), "
        f"{c.steps:,} steps of SGD (momentum {c.momentum:g}) on mini-batches of {c.batch_size} at each "
        f"rate, seed {c.seed}. A non-finite training loss ends a job there (\"diverged\"); its accuracy "
        "is then that of the diverged weights.", "",
        *table(["lr", *[label for _, label in NETS]],
               [[fmt_lr(lr), *[cell(last[net, lr]) for net, _ in NETS]] for lr in c.lrs]),
        "", "![accuracy vs learning rate](accuracy_vs_lr.png)", "",
    ]
    summary: dict = {}
    for net, label in NETS:
        done = [(lr, last[net, lr]) for lr in c.lrs if last[net, lr] is not None]
        if not done:
            continue
        best_lr, best = max(done, key=lambda p: (p[1]["test_accuracy"], -p[0]))
        diverged = [lr for lr, r in done if r["diverged"]]
        summary[net] = {"best_lr": best_lr, "best_accuracy": best["test_accuracy"], "diverged_lrs": diverged}
        lines.append(f"- {label}: best {pct(best['test_accuracy'])}% at lr {fmt_lr(best_lr)}; "
                     + (f"diverged at lr {', '.join(map(fmt_lr, diverged))}." if diverged else "never diverged."))
    rescued = [lr for lr in c.lrs if last["plain", lr] is not None and last["bn", lr] is not None
               and last["plain", lr]["diverged"] and not last["bn", lr]["diverged"]]
    if rescued:
        lines.append("- Where the plain net diverged, BN trained to "
                     + ", ".join(f"{pct(last['bn', lr]['test_accuracy'])}% (lr {fmt_lr(lr)})" for lr in rescued) + ".")
    summary["bn_trains_where_plain_diverges"] = {fmt_lr(lr): last["bn", lr]["test_accuracy"] for lr in rescued}
    good = {net: [lr for lr in c.lrs if last[net, lr] is not None and not last[net, lr]["diverged"]
                  and last[net, lr]["test_accuracy"] >= 0.9] for net, _ in NETS}
    for net, label in NETS:
        if good[net]:
            lines.append(f"- {label}: >= 90% test accuracy at {len(good[net])} of {len(c.lrs)} rates "
                         f"(lr {fmt_lr(min(good[net]))} .. {fmt_lr(max(good[net]))}).")
    lines.append("")
    return Report("\n".join(lines), summary)


@experiment("lr", LrConfig, _report)
def lr_sweep(run: Run) -> None:
    """Accuracy after a fixed budget against the learning rate (log grid), BN vs no BN."""
    c: LrConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(c.lrs) * len(NETS)
    for lr in c.lrs:
        for net, _ in NETS:
            classifier_job(
                run, _key(net, lr),
                build=lambda net=net: mlp(data.num_features, data.num_classes, c.hidden, c.depth,
                                          norm="bn" if net == "bn" else "none", activation=c.activation),
                optimizer=lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=c.momentum),
                x=data.train_x, y=data.train_y, test_x=data.test_x, test_y=data.test_y,
                steps=c.steps, batch_size=c.batch_size, seed=c.seed, tags={"net": net, "lr": lr},
            )
