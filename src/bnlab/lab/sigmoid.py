"""Saturating nonlinearities: BN makes a deep sigmoid MLP trainable where the plain one stalls.

Ioffe & Szegedy 2015, section 4.2.1: Inception with sigmoid nonlinearities never trained (accuracy
< 1/1000), while BN-x5-Sigmoid reached 69.8%. With BN each sigmoid input keeps a fixed mean and
variance, so units neither saturate nor collapse onto the flat middle where depth multiplies the
derivative (at most 1/4) layer after layer. Here: a sigmoid MLP deeper than the paper's 3-layer
MNIST net, LeCun-normal init, plain SGD; the report follows the test accuracy and the gradient norm
that reaches the first layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .common import NETS, bn_or_none, check_positive, load_data, train_mlp
from .datasets import DatasetConfig, by_dataset
from .reports import heading, pct, pyplot, save, staged_report, style_axes, table
from .runner import Run, RunView, experiment


@dataclass
class SigmoidConfig(DatasetConfig):
    depth: int = 8  # sigmoid hidden layers
    hidden: int = 100  # units per hidden layer
    steps: Optional[int] = None  # SGD steps per net; None: 3,000 on digits, 10,000 on mnist
    eval_every: Optional[int] = None  # test evaluations every so many steps; None: steps / 30
    batch_size: int = 60  # examples per mini-batch
    lr: float = 0.5  # plain SGD, both nets
    init_std: Optional[float] = (  # weights N(0, init_std^2); None: LeCun normal (1 / sqrt(fan_in))
        None
    )
    seed: int = 0  # initialization and mini-batch order (the same for both nets)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "SigmoidConfig":
        steps = by_dataset(self.steps, self.dataset, 3000, 10_000)
        c = replace(self, steps=steps, eval_every=self.eval_every or max(1, steps // 30))
        check_positive(c, "steps", "eval_every", "batch_size", "lr", "hidden", "depth")
        return c


@dataclass
class SigmoidSummary:
    """Every number the sigmoid report quotes, computed once from the run's rows."""

    # about six evaluations: (step, net -> (test accuracy, first-layer gradient norm or None))
    evaluations: list[tuple[int, dict[str, tuple[float, Optional[float]]]]]
    finals: dict[str, float]  # net -> final test accuracy
    plain_stalled: bool  # the plain net ended below 50%

    def headline(self) -> dict[str, Any]:
        """summary.json: both final accuracies and whether the plain net stalled."""
        if not self.finals:
            return {}
        out: dict[str, Any] = {f"final_accuracy_{net}": self.finals[net] for net, _ in NETS}
        out["plain_stalled"] = self.plain_stalled
        return out


def summarize(view: RunView) -> SigmoidSummary:
    """Both nets' accuracy and gradient norm at about six common evaluations, and at the end."""
    curves = {net: view.job_rows(net) for net, _ in NETS}
    if not all(curves.values()):
        return SigmoidSummary([], {}, False)
    marks = sorted({r["step"] for r in curves["plain"]} & {r["step"] for r in curves["bn"]})
    shown = [m for i, m in enumerate(marks) if i % max(1, len(marks) // 6) == 0 or m == marks[-1]]
    by_step = {net: {r["step"]: r for r in curves[net]} for net, _ in NETS}
    evaluations = [
        (
            m,
            {
                net: (by_step[net][m]["test_accuracy"], _grad_norm(by_step[net][m]))
                for net, _ in NETS
            },
        )
        for m in shown
    ]
    finals = {net: curves[net][-1]["test_accuracy"] for net, _ in NETS}
    return SigmoidSummary(evaluations, finals, finals["plain"] < 0.5)


def _grad_norm(row: dict) -> Optional[float]:
    """The row's first-layer gradient norm; None where there is none or it is not finite."""
    value = row.get("first_layer_grad_norm")
    return value if value is not None and math.isfinite(value) else None


def plot(view: RunView, summary: SigmoidSummary) -> None:
    """Test accuracy and the first layer's gradient norm (log) against the step, both nets
    (every evaluation: the curves come from the rows, not the summary's table)."""
    c: SigmoidConfig = view.config
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for (net, label), color in zip(NETS, ("C0", "C1")):
        rows = view.job_rows(net)
        axes[0].plot(
            [r["step"] for r in rows],
            [100 * r["test_accuracy"] for r in rows],
            color=color,
            label=label,
        )
        grads = [(r["step"], g) for r in rows if (g := _grad_norm(r)) is not None and g > 0]
        if grads:
            axes[1].plot(*zip(*grads), color=color, label=label)
    axes[1].set_yscale("log")
    style_axes(axes[0], "step", "test accuracy (%)")
    style_axes(axes[1], "step", "gradient norm at the first layer's weights")
    fig.suptitle(f"{c.dataset}: {c.depth} sigmoid hidden layers of {c.hidden}, SGD lr {c.lr:g}")
    save(fig, view.plot_path("sigmoid.png"))


def render(s: SigmoidSummary, c: SigmoidConfig) -> str:
    """report.md: the setup, accuracy and gradient norm over training, the final accuracies."""
    init = "LeCun-normal init" if c.init_std is None else f"N(0, {c.init_std:g}^2) init"
    lines = heading(
        "Saturating nonlinearities: a deep sigmoid MLP with and without BN",
        f"Dataset **{c.dataset}**; MLP with {c.depth} hidden layers of {c.hidden} sigmoid units "
        f"({init}; with BN, Linear without bias -> BatchNorm1d -> sigmoid), {c.steps:,} steps of "
        f"plain SGD at lr {c.lr:g}, batch {c.batch_size}, seed {c.seed}. The gradient norm is "
        "that of the last training step before each evaluation.",
    )
    if s.finals:
        lines += table(
            ["step", "accuracy without BN", "with BN", "grad norm without BN", "with BN"],
            [
                [
                    f"{m:,}",
                    pct(at["plain"][0]),
                    pct(at["bn"][0]),
                    _sci(at["plain"][1]),
                    _sci(at["bn"][1]),
                ]
                for m, at in s.evaluations
            ],
        )
        lines += [
            "",
            f"- Final test accuracy: without BN {pct(s.finals['plain'])}%, "
            f"with BN {pct(s.finals['bn'])}%"
            + (" (the plain net stalled near chance)." if s.plain_stalled else "."),
        ]
    lines += ["", "![sigmoid nets](sigmoid.png)", ""]
    return "\n".join(lines)


def _sci(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2e}"


@experiment("sigmoid", SigmoidConfig, staged_report(summarize, plot, render))
def sigmoid(run: Run) -> None:
    """BN makes a deep sigmoid MLP trainable where the same net without BN stalls."""
    c: SigmoidConfig = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(NETS)

    def grad_norm(i: int, model: torch.nn.Module) -> dict:
        g = model[0].weight.grad
        return {"first_layer_grad_norm": float(g.norm()) if g is not None else math.nan}

    for net, _ in NETS:
        train_mlp(
            run,
            net,
            data,
            c,
            norm=bn_or_none(net),
            mlp_options={"activation": "sigmoid", "init_std": c.init_std},
            optimizer=lambda p: torch.optim.SGD(p, lr=c.lr),
            eval_at_start=True,
            tags={"net": net},
            extra_eval=grad_norm,
        )
