"""Cooijmans et al. 2016, sequential and permuted MNIST: an LSTM against a BN-LSTM.

Each image is read as a sequence: one row per step (``--mode=row``, 28 steps of 28 pixels, the
quick default) or one pixel per step (``--mode=pixel``, 784 steps of 1 pixel, the paper's task);
``pmnist`` reads the pixels in one fixed random order (permuted MNIST). The classifier is a
one-layer recurrent net of 100 units whose last hidden state feeds a Linear softmax layer. The
paper's setup, for both nets: RMSProp at lr 1e-3, gradient norm clipped at 1, mini-batches of 100,
orthogonal input-to-hidden weights and identity hidden-to-hidden weights (each gate block), zero
biases; the BN-LSTM (:class:`bnlab.nn.BNLSTM`) starts every gamma at 0.1. The LSTM is
``torch.nn.LSTM`` with the same initialization.

The last ``valid_size`` training images are held out as a validation set; test and validation
accuracy are measured every ``eval_every`` steps in eval mode, optionally on the first
``eval_examples`` images only (the 784-step forward of 10,000 images is slow on a CPU). The
BN-LSTM is evaluated with per-step population statistics, estimated afresh before every evaluation
from ``population_batches`` training batches: with ``population_joint`` (row mode's default) those
batches run through the net as one batch, so every step is normalized with the statistics it
stores and they describe the values eval mode computes; otherwise Algorithm 2's average of
per-batch statistics, which on MNIST's nearly blank top rows describes values eval mode does not
compute and costs the row-by-row BN-LSTM up to 4 points of test accuracy (docs/results/seq-mnist).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from ..data import Split, permute_pixels, sequential
from ..inference import population_statistics
from ..nn import BNLSTM
from .common import Dataset, check_positive, evaluate, load_data, train_as_configured
from .reports import pct, pyplot, save, style_axes, table
from .runner import Report, Run, RunView, experiment
from .schedules import describe_schedule, lr_at_step

MODELS = ("lstm", "bnlstm")
# our choice for a paper-length pixel-by-pixel run (about 90 epochs), not the paper's number
LONG_PIXEL_STEPS = 50_000
LABELS = {"lstm": "LSTM", "bnlstm": "BN-LSTM"}
# the BN-LSTM evaluated with other statistics: (metrics column, line style, legend)
EXTRA_CURVES = (
    ("test_accuracy_algorithm2", "-.", "Algorithm 2's statistics"),
    ("test_accuracy_running", ":", "running averages"),
)
Mode = Literal["row", "pixel"]


@dataclass
class SeqMnistConfig:
    dataset: Dataset = "digits"  # digits: bundled 8x8 (8 rows / 64 pixels); mnist: IDX in data_dir
    data_dir: Optional[str] = None  # MNIST directory (selects mnist); None: $BNLAB_DATA_DIR
    mode: Mode = "row"  # row: one image row per step (28 on MNIST); pixel: one pixel per step (784)
    permute: bool = False  # read the pixels in one fixed random order (permuted MNIST; pixel mode)
    permutation_seed: int = 0  # the seed of that order
    models: tuple[str, ...] = MODELS  # some of lstm, bnlstm
    hidden: int = 100  # recurrent units (the paper: 100)
    steps: Optional[int] = None  # steps per net; None: mnist row 12,000, pixel 1,000; digits 1,500
    batch_size: int = 100  # the paper's mini-batch
    lr: float = 1e-3  # RMSProp learning rate (the paper: 1e-3)
    lr_drop_at: Optional[float] = None  # rate *= lr_drop past this fraction; None: constant (paper)
    lr_drop: float = 0.1  # the factor of that one final drop
    clip: float = 1.0  # gradient norm clipping (the paper: 1)
    gamma_init: float = 0.1  # BN-LSTM: every gamma's initial value (the paper: 0.1)
    bn_eps: float = 1e-2  # BN-LSTM: each BN's epsilon (smaller derails test statistics: see report)
    population_batches: int = 50  # BN-LSTM: batches for population statistics (0: running averages)
    population_joint: Optional[bool] = None  # run as one batch, else Algorithm 2; None: in row mode
    forget_bias: float = 0.0  # both nets: initial forget-gate bias
    valid_size: Optional[int] = None  # training images held out; None: 5,000 (mnist), 200 (digits)
    eval_every: Optional[int] = None  # steps between evaluations; None: steps / 40
    eval_examples: Optional[int] = None  # evaluate the first so many test/valid images; None: all
    target: float = 0.95  # the report's "steps to reach this test accuracy"
    seed: int = 0  # initialization (both nets) and the mini-batch order (shared by both nets)
    checkpoint_every: int = 500  # steps between checkpoints (0: none)

    def resolve(self) -> "SeqMnistConfig":
        mnist = self.dataset == "mnist"
        steps = self.steps or (1_500 if not mnist else 12_000 if self.mode == "row" else 1_000)
        joint = self.mode == "row" if self.population_joint is None else self.population_joint
        c = replace(
            self,
            steps=steps,
            eval_every=self.eval_every or max(1, steps // 40),
            population_joint=joint,
            valid_size=5_000
            if self.valid_size is None and mnist
            else 200
            if self.valid_size is None
            else self.valid_size,
        )
        check_positive(
            c, "steps", "batch_size", "lr", "clip", "hidden", "eval_every", "gamma_init", "bn_eps"
        )
        unknown = [m for m in c.models if m not in MODELS]
        if unknown or not c.models:
            raise ValueError(f"models must be some of {MODELS}, got {c.models}")
        if c.permute and c.mode != "pixel":
            raise ValueError("permute needs mode=pixel (a permutation of the pixels, one per step)")
        if c.lr_drop_at is not None and not (0 < c.lr_drop_at <= 1 and c.lr_drop > 0):
            raise ValueError(
                f"lr_drop_at must be in (0, 1] and lr_drop > 0, got {c.lr_drop_at}, {c.lr_drop}"
            )
        if c.population_batches < 0:
            raise ValueError(f"population_batches must be >= 0, got {c.population_batches}")
        if c.eval_examples is not None and c.eval_examples < 1:
            raise ValueError(f"eval_examples must be >= 1 or none, got {c.eval_examples}")
        if not 0 < c.target <= 1:
            raise ValueError(f"target must be in (0, 1], got {c.target}")
        return c


@dataclass
class PermutedMnistConfig(SeqMnistConfig):
    mode: Mode = "pixel"  # pixel: one pixel per step (784 on MNIST); the permutation needs it
    permute: bool = True  # read the pixels in one fixed random order (permuted MNIST)


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def sequence_data(config: SeqMnistConfig) -> tuple[Split, Split]:
    """(train, held-out) splits: train_x/train_y for training, test_x/test_y for the test set, and
    the validation images as the second split's test_x/test_y. Pixels permuted if asked."""
    data = load_data(config.dataset, config.data_dir)
    train_x, test_x = data.train_x, data.test_x
    if config.permute:
        both = permute_pixels(torch.cat([train_x, test_x]), config.permutation_seed)
        train_x, test_x = both[: len(train_x)], both[len(train_x) :]
    v = config.valid_size
    if not 0 <= v < len(train_x) - config.batch_size:
        raise ValueError(f"valid_size {v} leaves too few of the {len(train_x)} training images")
    n = config.eval_examples
    cut = len(train_x) - v
    train = Split(train_x[:cut], data.train_y[:cut], test_x[:n], data.test_y[:n])
    valid = Split(train_x[:0], data.train_y[:0], train_x[cut:][:n], data.train_y[cut:][:n])
    return train, valid


def paper_init_(lstm: nn.LSTM) -> nn.LSTM:
    """Orthogonal input-to-hidden, identity hidden-to-hidden (each gate block), zero biases."""
    H = lstm.hidden_size
    with torch.no_grad():
        for k in range(lstm.num_layers):
            nn.init.orthogonal_(getattr(lstm, f"weight_ih_l{k}"))
            getattr(lstm, f"weight_hh_l{k}").copy_(torch.eye(H).repeat(4, 1))
            getattr(lstm, f"bias_ih_l{k}").zero_()
            getattr(lstm, f"bias_hh_l{k}").zero_()
    return lstm


class SequenceClassifier(nn.Module):
    """Flattened images (N, side^2) -> a sequence (T, N, I) -> recurrent net -> Linear on h_T.

    In eval mode, inputs larger than ``eval_chunk`` are run in chunks (the statistics are fixed
    then, so chunking changes nothing but the memory a 784-step forward of 10,000 images needs).
    """

    def __init__(
        self,
        kind: str,
        mode: str,
        side: int,
        hidden: int,
        num_classes: int,
        gamma_init: float = 0.1,
        forget_bias: float = 0.0,
        eps: float = 1e-5,
        eval_chunk: int = 1000,
    ) -> None:
        super().__init__()
        self.kind, self.mode, self.side, self.eval_chunk = kind, mode, side, eval_chunk
        inputs, steps = (1, side * side) if mode == "pixel" else (side, side)
        if kind == "lstm":
            self.rnn = paper_init_(nn.LSTM(inputs, hidden))
            with torch.no_grad():
                self.rnn.bias_ih_l0[hidden : 2 * hidden].fill_(forget_bias)
        elif kind == "bnlstm":
            self.rnn = BNLSTM(
                inputs,
                hidden,
                max_length=steps,
                gamma_init=gamma_init,
                forget_bias=forget_bias,
                eps=eps,
            )
        else:
            raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and len(x) > self.eval_chunk:
            return torch.cat([self(part) for part in x.split(self.eval_chunk)])
        seq = sequential(x, self.mode, self.side).transpose(0, 1)  # (T, N, I)
        out, _ = self.rnn(seq)
        return self.head(out[-1])


class ClippedRMSprop(torch.optim.RMSprop):
    """RMSProp that first clips the global gradient norm of its parameters to ``clip``."""

    def __init__(self, params, clip: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.clip = clip

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        nn.utils.clip_grad_norm_(params, self.clip)
        return super().step(closure)


def build(kind: str, data: Split, config: SeqMnistConfig) -> SequenceClassifier:
    side = math.isqrt(data.num_features)
    return SequenceClassifier(
        kind,
        config.mode,
        side,
        config.hidden,
        data.num_classes,
        gamma_init=config.gamma_init,
        forget_bias=config.forget_bias,
        eps=config.bn_eps,
    )


# ------------------------------------------------------------------------------------------------
# Experiments
# ------------------------------------------------------------------------------------------------


def _train_all(run: Run) -> None:
    config: SeqMnistConfig = run.config
    train, valid = sequence_data(config)
    run.total_jobs = len(config.models)

    def metrics(step: int, model: nn.Module) -> dict:
        row: dict = {}
        saved = None
        if model.kind == "bnlstm" and config.population_batches:
            row["test_accuracy_running"] = evaluate(model, train.test_x, train.test_y)[
                "test_accuracy"
            ]
            saved = {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k}
            batches = population_batches(train, config, step)
            population_statistics(
                model, batches
            )  # Algorithm 2: the average of per-batch statistics
            if config.population_joint:  # the curve: the batches as one; Algorithm 2's beside it
                row["test_accuracy_algorithm2"] = evaluate(model, train.test_x, train.test_y)[
                    "test_accuracy"
                ]
                model.load_state_dict(saved, strict=False)
                population_statistics(model, [torch.cat(batches)])
            row.update(
                evaluate(model, train.test_x, train.test_y)
            )  # replaces the running-average row
        if len(valid.test_y):
            m = evaluate(model, valid.test_x, valid.test_y)
            row.update(valid_accuracy=m["test_accuracy"], valid_loss=m["test_loss"])
        if saved is not None:  # training goes on with its own running averages
            model.load_state_dict(saved, strict=False)
        return row

    for kind in config.models:
        train_as_configured(
            run,
            kind,
            train,
            config,
            build=lambda kind=kind: build(kind, train, config),
            optimizer=lambda p: ClippedRMSprop(p, config.clip, lr=config.lr),
            eval_at_start=True,
            tags={"model": kind},
            extra_eval=metrics,
            lr_at=lambda i: lr_at_step(config, i),
        )


def population_batches(train: Split, config: SeqMnistConfig, step: int) -> list[Tensor]:
    """The training batches of step ``step``'s population statistics (a generator of its own, so
    the run's mini-batch order and a resumed run's results do not depend on them)."""
    g = torch.Generator().manual_seed(1_000_003 * (config.seed + 1) + step)
    n = len(train.train_y)
    return [
        train.train_x[torch.randint(n, (config.batch_size,), generator=g)]
        for _ in range(config.population_batches)
    ]


def task_name(c: SeqMnistConfig) -> str:
    data = "MNIST" if c.dataset == "mnist" else "digits"
    if c.permute:
        return f"permuted pixel-by-pixel {data}"
    return f"{'row-by-row' if c.mode == 'row' else 'pixel-by-pixel'} {data}"


def first_reaching(rows: list[dict], target: float, key: str = "test_accuracy") -> Optional[int]:
    """The first evaluated step whose accuracy is >= target (None if none)."""
    return next((r["step"] for r in rows if r.get(key) is not None and r[key] >= target), None)


@dataclass
class ModelResult:
    """One recurrent net's test accuracy over the run."""

    final_test_accuracy: float
    best_test_accuracy: float
    best_step: int
    steps_to_target: Optional[int]  # the first evaluated step at >= the target (None: never)
    last_step: int
    final_valid_accuracy: Optional[float]
    final_other: dict[str, float]  # the last row's accuracies with other BN statistics, by column

    def headline(self, target: float) -> dict[str, Any]:
        return {
            "final_test_accuracy": self.final_test_accuracy,
            "best_test_accuracy": self.best_test_accuracy,
            "best_step": self.best_step,
            f"steps_to_{target:g}": self.steps_to_target,
            "last_step": self.last_step,
            "final_valid_accuracy": self.final_valid_accuracy,
            **{f"final_{column}": value for column, value in self.final_other.items()},
        }


@dataclass
class HeadToHead:
    """The BN-LSTM against the LSTM at the evaluations both have (step 0 left out)."""

    ahead: int  # evaluations where the BN-LSTM's test accuracy is higher
    evaluations: int
    first_step: int
    last_step: int
    last_accuracy: dict[str, float]  # model -> test accuracy at the last common step


@dataclass
class SeqMnistSummary:
    """Every number the sequential-MNIST report quotes, computed once from the run's rows."""

    task: str
    steps: int
    target: float
    models: dict[str, ModelResult]  # the models with rows, in the config's order
    head_to_head: Optional[HeadToHead]  # None unless both models have common evaluations

    def headline(self) -> dict[str, Any]:
        """summary.json: each model's results, then the BN-LSTM's lead."""
        out: dict[str, Any] = {"task": self.task, "steps": self.steps}
        out.update({m: r.headline(self.target) for m, r in self.models.items()})
        if self.head_to_head is not None:
            out["bnlstm_ahead_at"] = f"{self.head_to_head.ahead}/{self.head_to_head.evaluations}"
        return out


def summarize(view: RunView) -> SeqMnistSummary:
    """Each model's results and, with both models, how they compare evaluation by evaluation."""
    c: SeqMnistConfig = view.config
    curves = _curves(view)
    return SeqMnistSummary(
        task_name(c),
        c.steps,
        c.target,
        {m: _model_result(rows, c.target) for m, rows in curves.items()},
        _head_to_head(curves),
    )


def _curves(view: RunView) -> dict[str, list[dict]]:
    c: SeqMnistConfig = view.config
    return {m: view.job_rows(m) for m in c.models if view.job_rows(m)}


def _model_result(rows: list[dict], target: float) -> ModelResult:
    last = rows[-1]
    best = max(rows, key=lambda r: r["test_accuracy"])
    return ModelResult(
        last["test_accuracy"],
        best["test_accuracy"],
        best["step"],
        first_reaching(rows, target),
        last["step"],
        last.get("valid_accuracy"),
        {other: last[other] for other, _, _ in EXTRA_CURVES if other in last},
    )


def _head_to_head(curves: dict[str, list[dict]]) -> Optional[HeadToHead]:
    if set(curves) != {"lstm", "bnlstm"}:
        return None
    acc = {m: {r["step"]: r["test_accuracy"] for r in rows} for m, rows in curves.items()}
    common = sorted(set(acc["lstm"]) & set(acc["bnlstm"]) - {0})
    if not common:
        return None
    ahead = [s for s in common if acc["bnlstm"][s] > acc["lstm"][s]]
    return HeadToHead(
        len(ahead),
        len(common),
        common[0],
        common[-1],
        {m: acc[m][common[-1]] for m in ("bnlstm", "lstm")},
    )


def plot(view: RunView) -> None:
    """accuracy.png: test (and validation) accuracy against the step, one curve per model, and
    the BN-LSTM evaluated with other statistics beside its test curve."""
    c: SeqMnistConfig = view.config
    curves = _curves(view)
    has_valid = any("valid_accuracy" in r for rows in curves.values() for r in rows)
    keys = [("test_accuracy", "test")] + ([("valid_accuracy", "validation")] if has_valid else [])
    fig, axes = pyplot().subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        _plot_panel(ax, curves, key)
        lowest = min(100 * r[key] for rows in curves.values() for r in rows[1:] or rows)
        ax.set_ylim(max(0, lowest - 2), 100.5)
        style_axes(ax, "training step", f"{label} accuracy (%)", loc="lower right")
    fig.suptitle(
        f"{task_name(c)}: LSTM vs BN-LSTM ({c.hidden} units, RMSProp "
        f"{describe_schedule(c)}, batch {c.batch_size})"
    )
    save(fig, view.plot_path("accuracy.png"))


def _plot_panel(ax, curves: dict[str, list[dict]], key: str) -> None:
    for m, rows in curves.items():
        ax.plot([r["step"] for r in rows], [100 * r[key] for r in rows], label=LABELS[m])
        for other, style, what in EXTRA_CURVES:
            extra = [r for r in rows if key == "test_accuracy" and other in r]
            if extra:
                ax.plot(
                    [r["step"] for r in extra],
                    [100 * r[other] for r in extra],
                    style,
                    color="C1",
                    label=f"{LABELS[m]}, {what}",
                )


def render(s: SeqMnistSummary, c: SeqMnistConfig) -> str:
    """report.md: the setup, the results table, how the BN-LSTM was evaluated, the findings."""
    lines = [
        *_setup_lines(c),
        *table(
            [
                "net",
                "steps",
                "final test %",
                "final valid %",
                "best test %",
                f"first step at >= {100 * c.target:g}% test",
            ],
            [
                [
                    LABELS[m],
                    f"{r.last_step:,}",
                    pct(r.final_test_accuracy),
                    pct(r.final_valid_accuracy),
                    f"{pct(r.best_test_accuracy)} (step {r.best_step:,})",
                    "-" if r.steps_to_target is None else f"{r.steps_to_target:,}",
                ]
                for m, r in s.models.items()
            ],
        ),
        "",
    ]
    if c.population_batches and "bnlstm" in s.models:
        lines += [_population_text(c), ""]
    if s.head_to_head is not None:
        lines += _head_to_head_lines(s.head_to_head, s.models, c.target)
    if c.dataset == "mnist" and c.mode == "pixel" and c.steps < LONG_PIXEL_STEPS:
        lines += _long_run_lines(c)
    return "\n".join(lines) + "\n"


def _setup_lines(c: SeqMnistConfig) -> list[str]:
    test_set = "test" if c.eval_examples is None else f"first {c.eval_examples:,} test"
    order = f" in a fixed random order (seed {c.permutation_seed})" if c.permute else ""
    return [
        f"# {task_name(c)}: LSTM vs BN-LSTM (Cooijmans et al. 2016)",
        "",
        f"One recurrent layer of {c.hidden} units, the last hidden state into a softmax layer; "
        f"{'one row' if c.mode == 'row' else 'one pixel'} per step{order}. "
        f"RMSProp {describe_schedule(c)}, gradient norm clipped at {c.clip:g}, batches of "
        f"{c.batch_size}, {c.steps:,} steps per net, seed {c.seed}; orthogonal input-to-hidden "
        "and identity hidden-to-hidden weights for both nets; BN-LSTM gammas start at "
        f"{c.gamma_init:g}. The last {c.valid_size:,} training images are the validation set; "
        f"accuracies on the {test_set} images every {c.eval_every:,} steps, in eval mode "
        "(per-step population statistics).",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]


def _head_to_head_lines(h: HeadToHead, models: dict[str, ModelResult], target: float) -> list[str]:
    words = {
        m: "not within the run" if r.steps_to_target is None else f"at step {r.steps_to_target:,}"
        for m, r in models.items()
    }
    return [
        f"- BN-LSTM ahead of the LSTM (test accuracy) at {h.ahead} of {h.evaluations} common "
        f"evaluations (steps {h.first_step:,} to {h.last_step:,}).",
        f"- {100 * target:g}% test accuracy: BN-LSTM {words['bnlstm']}, LSTM {words['lstm']}.",
        f"- At step {h.last_step:,}: BN-LSTM {pct(h.last_accuracy['bnlstm'])}%, "
        f"LSTM {pct(h.last_accuracy['lstm'])}%.",
    ]


def _long_run_lines(c: SeqMnistConfig) -> list[str]:
    """How to run a pixel-by-pixel task for as long as the paper (this run is a budget one)."""
    name = "pmnist" if c.permute else "seq-mnist --mode=pixel"
    epochs = LONG_PIXEL_STEPS * c.batch_size // (60_000 - c.valid_size)
    return [
        "",
        f"This is a budget run ({c.steps:,} steps per net). A run of the paper's length "
        f"(tens of thousands of steps; {LONG_PIXEL_STEPS:,} steps is about {epochs} epochs):",
        "",
        f"    bnlab run {name} --dataset=mnist --data_dir=MNIST_DIR "
        f"--steps={LONG_PIXEL_STEPS} --eval_every=1000 --threads=1",
    ]


def _report(view: RunView) -> Report:
    summary = summarize(view)
    if not summary.models:
        return Report(f"# {summary.task}: LSTM vs BN-LSTM\n\nNo evaluations yet.\n", {})
    plot(view)
    return Report(render(summary, view.config), summary.headline())


def _population_text(c: SeqMnistConfig) -> str:
    """How the report's BN-LSTM curve was evaluated (a config.json from before population_joint
    existed has None there: those runs used Algorithm 2)."""
    common = (
        "Training then continues with its own running averages; the dotted curve is the same "
        f"net evaluated with the running averages (momentum 0.1). BN epsilon {c.bn_eps:g}."
    )
    if c.population_joint:
        return (
            "The BN-LSTM is evaluated with per-time-step population statistics of "
            f"{c.population_batches * c.batch_size:,} training images drawn afresh before every "
            "evaluation and run through the net as one batch "
            "(`bnlab.inference.population_statistics` given one batch): every step is normalized "
            "with the statistics it stores, so they describe the values the net computes in eval "
            "mode. Algorithm 2's average of per-batch statistics (`--population_joint=false`) "
            "describes values computed with each batch's own statistics at the earlier steps "
            "instead: MNIST's top rows are blank in most images, a batch's statistics at the steps "
            "that read them hinge on the few images with ink there, and the statistics of the "
            "steps after them come out shifted in a way the eval-mode recurrence amplifies; the "
            "dash-dot curve is the same net evaluated with Algorithm 2's "
            f"statistics of the same batches. {common}"
        )
    return (
        "The BN-LSTM is evaluated with Algorithm 2's population statistics, per time step, over "
        f"{c.population_batches} training batches drawn afresh before every evaluation "
        f"(`bnlab.inference.population_statistics`, the average of per-batch statistics). {common} "
        "MNIST's border pixels are blank in most images, so at the steps that read them a batch's "
        "statistics hinge on the few images with ink there; the running averages of the last ~10 "
        "batches, and statistics with a small epsilon, turn those steps' rare values into large "
        "ones at test time, and the error compounds along the sequence."
    )


@experiment("seq-mnist", SeqMnistConfig, _report)
def seq_mnist(run: Run) -> None:
    """Sequential MNIST (row by row, or --mode=pixel): LSTM vs BN-LSTM (Cooijmans et al. 2016)."""
    _train_all(run)


@experiment("pmnist", PermutedMnistConfig, _report)
def pmnist(run: Run) -> None:
    """Permuted pixel-by-pixel MNIST (784 steps): LSTM vs BN-LSTM (Cooijmans et al. 2016)."""
    _train_all(run)
