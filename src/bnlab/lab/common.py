"""What the experiments share: the classifier training job, models, plotting and report tables.

The dataset helpers live in :mod:`bnlab.lab.datasets` (the runner needs them too) and are
importable from here as well.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data import Split
from .datasets import DATASETS, Dataset, by_dataset, images, load_data  # noqa: F401 (re-exported)
from .runner import Report, Run, RunView, seeded

# The two nets the BN-against-none experiments compare: (job key, label in reports and plots).
NETS = (("plain", "without BN"), ("bn", "with BN"))


def check_positive(config: Any, *names: str) -> None:
    """Fail config validation (ValueError) unless every named field is set and > 0."""
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 10_000) -> dict[str, float]:
    """Test accuracy and loss in eval mode (BN uses its running statistics); the mode is
    restored."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        correct += int((logits.argmax(dim=1) == y[i : i + batch]).sum())
        loss += float(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    model.train(was_training)
    return {"test_accuracy": correct / len(y), "test_loss": loss / len(y)}


def classifier_job(
    run: Run,
    key: str,
    *,
    build: Callable[[], nn.Module],
    optimizer: Callable[[Any], torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    steps: int,
    batch_size: int,
    seed: int,
    batch_seed: Optional[int] = None,
    eval_every: Optional[int] = None,
    eval_at_start: bool = False,
    tags: Optional[Mapping[str, Any]] = None,
    extra_eval: Optional[Callable[[int, nn.Module], Mapping[str, Any]]] = None,
    state: Optional[dict[str, Any]] = None,
    hooks: Optional[Callable[[nn.Module], dict[str, Any]]] = None,
    lr_at: Optional[Callable[[int], float]] = None,
) -> dict[str, Any]:
    """Train ``build()`` (built under ``seeded(seed)``) on random mini-batches of ``batch_size``
    (drawn with replacement from a generator seeded with ``batch_seed``, default ``seed + 1``) with
    cross-entropy for ``steps`` steps; rows carry the test accuracy and loss at every evaluation.

    ``hooks(model)`` may attach diagnostics and return them by name (they are checkpointed);
    ``extra_eval(step, model)`` adds columns to every evaluation row (it runs after the test
    forward). ``lr_at(step)``: the learning rate of step i (a function of i alone, so resuming needs
    no state).
    """
    with seeded(seed):
        model = build()
    model.train()
    opt = optimizer(model.parameters())
    generator = torch.Generator().manual_seed(seed + 1 if batch_seed is None else batch_seed)
    extra_state = dict(state or {})
    if hooks is not None:
        extra_state.update(hooks(model))
    n = len(y)

    def step(i: int) -> Tensor:
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
        batch = torch.randint(n, (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def evaluate_(i: int) -> dict[str, Any]:
        row: dict[str, Any] = evaluate(model, test_x, test_y)
        if extra_eval is not None:
            row.update(extra_eval(i, model))
        return row

    try:
        return run.train(
            key,
            steps=steps,
            step=step,
            evaluate=evaluate_,
            state={"model": model, "optimizer": opt, "batches": generator, **extra_state},
            eval_every=eval_every,
            eval_at_start=eval_at_start,
            tags=tags,
        )
    finally:
        for obj in extra_state.values():
            if hasattr(obj, "remove"):
                obj.remove()


def train_on_split(run: Run, key: str, data: Split, **job: Any) -> dict[str, Any]:
    """:func:`classifier_job` on ``data``: trained on its training set, evaluated on its test
    set."""
    return classifier_job(
        run, key, x=data.train_x, y=data.train_y, test_x=data.test_x, test_y=data.test_y, **job
    )


def train_mlp(
    run: Run,
    key: str,
    data: Split,
    config: Any,
    *,
    norm: str,
    mlp_options: Optional[Mapping[str, Any]] = None,
    **job: Any,
) -> dict[str, Any]:
    """One job of an MLP sweep: ``config``'s MLP (``hidden`` units, ``depth`` hidden layers, the
    ``norm``, any other :func:`mlp` options) trained on ``data`` with ``config``'s ``steps``,
    ``batch_size`` and ``seed`` unless ``job`` names its own (with the optimizer, tags, ...)."""
    for name in ("steps", "batch_size", "seed"):
        if name not in job:
            job[name] = getattr(config, name)
    options = dict(mlp_options or {})

    def build() -> nn.Sequential:
        return mlp(
            data.num_features, data.num_classes, config.hidden, config.depth, norm=norm, **options
        )

    return train_on_split(run, key, data, build=build, **job)


def sweep(
    run: Run, values: Sequence[Any], nets: Sequence[str], job: Callable[[Split, Any, str], Any]
) -> None:
    """Run ``job(data, value, net)`` for every value of a sweep (outermost) and every net, on the
    config's dataset, after telling the progress bar how many jobs there are."""
    data = load_data(run.config.dataset, run.config.data_dir)
    run.total_jobs = len(values) * len(nets)
    for value in values:
        for net in nets:
            job(data, value, net)


def final_rows(
    view: RunView, nets: Sequence[str], values: Sequence[Any], key: Callable[[str, Any], str]
) -> dict[tuple[str, Any], Optional[dict]]:
    """The last row of every (net, value) job of a sweep, keyed (net, value); None: not run yet."""
    return {(net, value): view.last(key(net, value)) for net in nets for value in values}


def finished(
    finals: Mapping[tuple[str, Any], Optional[dict]], net: str, values: Sequence[Any]
) -> list[tuple[Any, dict]]:
    """(value, last row) of the net's finished jobs in :func:`final_rows`, in sweep order."""
    return [(value, finals[net, value]) for value in values if finals[net, value] is not None]


def bn_or_none(net: str) -> str:
    """The :func:`mlp` norm of a net named "bn" (with BN) or "plain" (without)."""
    return "bn" if net == "bn" else "none"


# -- models ----------------------------------------------------------------------------------------


def mlp(
    in_features: int,
    num_classes: int,
    hidden: int,
    depth: int,
    norm: str = "none",
    activation: str = "relu",
    init_std: Optional[float] = None,
) -> nn.Sequential:
    """Linear -> [norm] -> activation, ``depth`` times, then a Linear to the logits.

    ``norm``: "none", "bn" (bnlab BatchNorm1d) or "ln" (bnlab LayerNorm); with a norm the hidden
    Linear has no bias (beta replaces it). ``init_std``: Gaussian N(0, init_std^2) weights and zero
    biases everywhere; None keeps He (ReLU) / LeCun (sigmoid, tanh) normal init.
    """
    from ..nn import BatchNorm1d, LayerNorm

    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    if norm not in ("none", "bn", "ln"):
        raise ValueError(f"norm must be 'none', 'bn' or 'ln', got {norm!r}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden, bias=norm == "none"))
        if norm == "bn":
            layers.append(BatchNorm1d(hidden))
        elif norm == "ln":
            layers.append(LayerNorm(hidden))
        layers.append(acts[activation]())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    gain = 2.0 if activation == "relu" else 1.0
    for module in layers:
        if isinstance(module, nn.Linear):
            std = init_std if init_std is not None else math.sqrt(gain / module.in_features)
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return nn.Sequential(*layers)


# -- plots and tables ------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def style_axes(ax, xlabel: str, ylabel: Optional[str] = None, **legend: Any) -> None:
    """The lab's axes: labels, a light grid, a legend (``legend``: its keyword arguments)."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def batch_size_axes(ax, sizes: Sequence[int], title: str) -> None:
    """Test accuracy in percent against the batch size on a log2 axis, each size labelled."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_title(title)
    style_axes(ax, "examples per batch", "test accuracy (%)")


def staged_report(
    summarize: Callable[[RunView], Any],
    plot: Callable[[RunView, Any], None],
    render: Callable[[Any, Any], str],
) -> Callable[[RunView], Report]:
    """An experiment's report in three stages, so that the text cannot disagree with the numbers:
    ``summarize(view)`` computes every number once (an object with ``headline()``, the dict
    written to summary.json), ``plot(view, summary)`` draws the figures and
    ``render(summary, config)`` only formats the summary's numbers as markdown."""

    def report(view: RunView) -> Report:
        summary = summarize(view)
        plot(view, summary)
        return Report(render(summary, view.config), summary.headline())

    return report


def heading(title: str, *paragraphs: str) -> list[str]:
    """A report's first lines: the title, then each paragraph followed by a blank line."""
    lines = [f"# {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def pct(value: Optional[float]) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return lines


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"
