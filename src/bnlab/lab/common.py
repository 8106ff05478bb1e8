"""What the experiments share on the training side: the classifier job, sweeps, models.

The dataset helpers live in :mod:`bnlab.lab.datasets` (the runner needs them too) and are
importable from here as well; the report helpers (plots, markdown) live in
:mod:`bnlab.lab.reports`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn

from ..data import Split
from .datasets import DATASETS, Dataset, by_dataset, images, load_data  # noqa: F401 (re-exported)
from .runner import Run, RunView, seeded

# The two nets the BN-against-none experiments compare: (job key, label in reports and plots).
NETS = (("plain", "without BN"), ("bn", "with BN"))


def check_positive(config: Any, *names: str) -> None:
    """Fail config validation (ValueError) unless every named field is set and > 0."""
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def ascending_positive(name: str, values: Sequence[float]) -> tuple[float, ...]:
    """A sweep's values in ascending order; config validation fails (ValueError) if there are none
    or one is not > 0."""
    values = tuple(sorted(values))
    if not values or values[0] <= 0:
        raise ValueError(f"{name} must be positive, got {values}")
    return values


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


def train_as_configured(run: Run, key: str, data: Split, config: Any, **job: Any) -> dict[str, Any]:
    """:func:`train_on_split` with ``config``'s ``steps``, ``batch_size``, ``seed`` and
    ``eval_every`` (those of them it has) unless ``job`` names its own."""
    for name in ("steps", "batch_size", "seed", "eval_every"):
        if name not in job and hasattr(config, name):
            job[name] = getattr(config, name)
    return train_on_split(run, key, data, **job)


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
    ``norm``, any other :func:`mlp` options) trained on ``data`` as :func:`train_as_configured`
    (``job``: the optimizer, tags, ...)."""
    options = dict(mlp_options or {})

    def build() -> nn.Sequential:
        return mlp(
            data.num_features, data.num_classes, config.hidden, config.depth, norm=norm, **options
        )

    return train_as_configured(run, key, data, config, build=build, **job)


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


def bn_or_none(net: str) -> str:
    """The :func:`mlp` norm of a net named "bn" (with BN) or "plain" (without)."""
    return "bn" if net == "bn" else "none"


# -- BN against none across one setting ------------------------------------------------------------

Finals = Mapping[tuple[str, Any], Optional[dict]]
T = TypeVar("T")


@dataclass(frozen=True)
class NetSweep:
    """An experiment that trains the config's MLP without and with BN (:data:`NETS`) at every
    value of one setting, e.g. the learning rate: one job per (net, value)."""

    name: str  # the setting in job keys and tags, e.g. "lr"
    fmt: Callable[[Any], str]  # a value as job keys write it

    def key(self, net: str, value: Any) -> str:
        """The job of one net at one value, e.g. "bn/lr=0.1"."""
        return f"{net}/{self.name}={self.fmt(value)}"

    def train(
        self, run: Run, values: Sequence[Any], options: Callable[[Split, Any], Mapping[str, Any]]
    ) -> None:
        """Train every job (:func:`sweep`, values outermost): :func:`train_mlp` with the net's norm,
        tagged with the net and the value, and the options ``options(data, value)`` (the
        optimizer, ...)."""

        def job(data: Split, value: Any, net: str) -> None:
            train_mlp(
                run,
                self.key(net, value),
                data,
                run.config,
                norm=bn_or_none(net),
                tags={"net": net, self.name: value},
                **options(data, value),
            )

        sweep(run, values, [net for net, _ in NETS], job)

    def final_rows(
        self, view: RunView, values: Sequence[Any]
    ) -> dict[tuple[str, Any], Optional[dict]]:
        """The last row of every job, keyed (net, value); None: not run yet."""
        return {(net, v): view.last(self.key(net, v)) for net, _ in NETS for v in values}


def finished(finals: Finals, net: str) -> list[tuple[Any, dict]]:
    """(value, last row) of the net's finished jobs in :meth:`NetSweep.final_rows`, in sweep
    order."""
    return [(value, row) for (n, value), row in finals.items() if n == net and row is not None]


def per_net(finals: Finals, summarize: Callable[[list[tuple[Any, dict]]], T]) -> dict[str, T]:
    """``summarize(finished(finals, net))`` of every net with a finished job, by net."""
    return {net: summarize(done) for net, _ in NETS if (done := finished(finals, net))}


def per_net_lines(results: Mapping[str, T], line: Callable[[str, T], str]) -> list[str]:
    """A report's ``line(label, result)`` of every net (:data:`NETS` order) that has a result."""
    return [line(label, results[net]) for net, label in NETS if net in results]


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
