"""Saturating nonlinearities: BN makes a deep sigmoid MLP trainable where the plain one stalls.

Ioffe & Szegedy 2015, section 4.2.1: Inception with sigmoid nonlinearities never trained (accuracy
< 1/1000), while BN-x5-Sigmoid reached 69.8%. With BN each sigmoid input keeps a fixed mean and
variance, so units neither saturate nor collapse onto the flat middle where depth multiplies the
derivative (at most 1/4) layer after layer. Here: a sigmoid MLP deeper than the paper's 3-layer MNIST
net, LeCun-normal init, plain SGD; the report follows the test accuracy and the gradient norm that
reaches the first layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .common import Dataset, by_dataset, check_positive, classifier_job, load_data, mlp, pct, pyplot, save, table
from .runner import Report, Run, RunView, experiment

NETS = (("plain", "without BN"), ("bn", "with BN"))


@dataclass
class SigmoidConfig:
    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR
    depth: int = 8  # sigmoid hidden layers
    hidden: int = 100  # units per hidden layer
    steps: Optional[int] = None  # SGD steps per net; None: 3,000 on digits, 10,000 on mnist
    eval_every: Optional[int] = None  # test evaluations every so many steps; None: steps / 30
    batch_size: int = 60  # examples per mini-batch
    lr: float = 0.5  # plain SGD, both nets
    init_std: Optional[float] = None  # weights N(0, init_std^2); None: LeCun normal (1 / sqrt(fan_in))
    seed: int = 0  # initialization and mini-batch order (the same for both nets)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "SigmoidConfig":
        steps = by_dataset(self.steps, self.dataset, 3000, 10_000)
        c = replace(self, steps=steps, eval_every=self.eval_every or max(1, steps // 30))
        check_positive(c, "steps", "eval_every", "batch_size", "lr", "hidden", "depth")
        return c


def _report(view: RunView) -> Report:
    c: SigmoidConfig = view.config
    curves = {net: view.job_rows(net) for net, _ in NETS}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        rows = curves[net]
        axes[0].plot([r["step"] for r in rows], [100 * r["test_accuracy"] for r in rows], color=color, label=label)
        g = [(r["step"], r["first_layer_grad_norm"]) for r in rows
             if r.get("first_layer_grad_norm") is not None and math.isfinite(r["first_layer_grad_norm"])
             and r["first_layer_grad_norm"] > 0]
        if g:
            axes[1].plot(*zip(*g), color=color, label=label)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("gradient norm at the first layer's weights")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{c.dataset}: {c.depth} sigmoid hidden layers of {c.hidden}, SGD lr {c.lr:g}")
    save(fig, view.plot_path("sigmoid.png"))
    lines = [
        "# Saturating nonlinearities: a deep sigmoid MLP with and without BN", "",
        f"Dataset **{c.dataset}**; MLP with {c.depth} hidden layers of {c.hidden} sigmoid units ("
        + ("LeCun-normal init" if c.init_std is None else f"N(0, {c.init_std:g}^2) init")
        + f"; with BN, Linear without bias -> BatchNorm1d -> sigmoid), {c.steps:,} steps of plain SGD at lr "
        f"{c.lr:g}, batch {c.batch_size}, seed {c.seed}. The gradient norm is that of the last training "
        "step before each evaluation.", "",
    ]
    summary: dict = {}
    finals = {net: rows[-1] for net, rows in curves.items() if rows}
    if len(finals) == len(NETS):
        marks = sorted({r["step"] for r in curves["plain"]} & {r["step"] for r in curves["bn"]})
        shown = [m for i, m in enumerate(marks) if i % max(1, len(marks) // 6) == 0 or m == marks[-1]]
        acc = {net: {r["step"]: r for r in curves[net]} for net, _ in NETS}

        def grad(r):
            v = r.get("first_layer_grad_norm")
            return "-" if v is None or not math.isfinite(v) else f"{v:.2e}"

        lines += table(["step", "accuracy without BN", "with BN", "grad norm without BN", "with BN"],
                       [[f"{m:,}", pct(acc["plain"][m]["test_accuracy"]), pct(acc["bn"][m]["test_accuracy"]),
                         grad(acc["plain"][m]), grad(acc["bn"][m])] for m in shown])
        for net, label in NETS:
            summary[f"final_accuracy_{net}"] = finals[net]["test_accuracy"]
        stalled = finals["plain"]["test_accuracy"] < 0.5
        lines += ["", f"- Final test accuracy: without BN {pct(finals['plain']['test_accuracy'])}%, "
                      f"with BN {pct(finals['bn']['test_accuracy'])}%"
                  + (" (the plain net stalled near chance)." if stalled else ".")]
        summary["plain_stalled"] = stalled
    lines += ["", "![sigmoid nets](sigmoid.png)", ""]
    return Report("\n".join(lines), summary)


@experiment("sigmoid", SigmoidConfig, _report)
def sigmoid(run: Run) -> None:
    """BN makes a deep sigmoid MLP trainable where the same net without BN stalls."""
    c: SigmoidConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(NETS)

    def grad_norm(i: int, model: torch.nn.Module) -> dict:
        g = model[0].weight.grad
        return {"first_layer_grad_norm": float(g.norm()) if g is not None else math.nan}

    for net, _ in NETS:
        classifier_job(
            run, net,
            build=lambda net=net: mlp(data.num_features, data.num_classes, c.hidden, c.depth,
                                      norm="bn" if net == "bn" else "none", activation="sigmoid",
                                      init_std=c.init_std),
            optimizer=lambda p: torch.optim.SGD(p, lr=c.lr),
            x=data.train_x, y=data.train_y, test_x=data.test_x, test_y=data.test_y,
            steps=c.steps, batch_size=c.batch_size, seed=c.seed, eval_every=c.eval_every,
            eval_at_start=True, tags={"net": net}, extra_eval=grad_norm,
        )
