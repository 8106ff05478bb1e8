"""Small batches: BN against batch renorm, ghost BN, layer norm and group norm, by batch size.

BN's statistics come from the batch, so tiny batches make them noisy in training and unlike the
running statistics used at test time (Wu & He 2018, Group Normalization, Figure 1 and section 4.1:
ResNet-50's ImageNet error rises from 23.6% at 32 images per GPU to 34.7% at 2, while GroupNorm
stays near 24.1%). This experiment shows the same on the bundled digits with an MLP, where a
BatchNorm1d layer's statistics run over the batch alone (m = N): Linear -> norm -> ReLU, twice,
then a Linear; SGD with momentum for a fixed number of epochs at each batch size, learning rate
scaled linearly below batch 32.

In the lab framework this is ``bnlab run small-batch`` (one job per norm, batch size and seed,
checkpointed and resumable); :func:`run` and :func:`write_outputs` remain as the plain-Python API.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

import torch
from torch import nn

from ..data import Split
from ..nn import BatchNorm1d, BatchRenorm1d, GhostBatchNorm1d, LayerNorm
from .common import Dataset, load_data, train_on_split
from .mlp import accuracy
from .reports import batch_size_axes, pct, pyplot, table
from .runner import Report, Run, RunView, experiment

NORMS = ("bn", "renorm", "ghost", "layernorm", "groupnorm")
LABELS = {
    "bn": "BatchNorm",
    "renorm": "BatchRenorm",
    "ghost": "GhostBatchNorm",
    "layernorm": "LayerNorm",
    "groupnorm": "GroupNorm",
}


@dataclass
class SmallBatchConfig:
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)  # examples per batch
    norms: tuple[str, ...] = NORMS  # some of bn, renorm, ghost, layernorm, groupnorm
    seeds: tuple[int, ...] = (0,)  # one run per seed (init, batch order); the report averages them
    epochs: int = 8  # the same number of passes over the data at every batch size
    hidden: int = 128  # width of both hidden layers
    lr: float = 0.05  # SGD learning rate at batch >= 32; lr * batch / 32 below
    sgd_momentum: float = 0.9  # SGD momentum
    bn_momentum: float = 0.1  # every running-statistics EMA (renorm's paper default 0.01 lags here)
    virtual_batch_size: int = 16  # ghost BN; at or below 2x this it is plain BN
    renorm_warmup_steps: int = 100  # renorm schedule, scaled down from the paper's 5k / 40k / 25k
    renorm_r_max_steps: int = 1000  # renorm: r_max reaches its limit at this step
    renorm_d_max_steps: int = 600  # renorm: d_max reaches its limit at this step
    groups: int = 8  # group norm's groups of features
    dataset: Dataset = "digits"  # digits (bundled) or mnist (IDX files in data_dir)
    data_dir: Optional[str] = None  # MNIST directory (selects mnist); None: $BNLAB_DATA_DIR
    checkpoint_every: int = 1000  # steps between checkpoints within a job (0: none)

    def resolve(self) -> "SmallBatchConfig":
        unknown = [kind for kind in self.norms if kind not in NORMS]
        if unknown:  # fail before any training
            raise ValueError(f"unknown normalization(s) {unknown}; expected some of {NORMS}")
        if not self.batch_sizes or min(self.batch_sizes) < 2:
            raise ValueError(f"batch sizes must be >= 2, got {self.batch_sizes}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.epochs < 1 or self.hidden < 1 or not self.lr > 0:
            raise ValueError("epochs, hidden and lr must be positive")
        return self


def make_norm(kind: str, features: int, config: SmallBatchConfig) -> nn.Module:
    if kind == "bn":
        return BatchNorm1d(features, momentum=config.bn_momentum)
    if kind == "renorm":
        return BatchRenorm1d(
            features,
            momentum=config.bn_momentum,
            warmup_steps=config.renorm_warmup_steps,
            r_max_steps=config.renorm_r_max_steps,
            d_max_steps=config.renorm_d_max_steps,
        )
    if kind == "ghost":
        return GhostBatchNorm1d(
            features, momentum=config.bn_momentum, virtual_batch_size=config.virtual_batch_size
        )
    if kind == "layernorm":
        return LayerNorm(features)
    if kind == "groupnorm":
        return nn.GroupNorm(config.groups, features)
    raise ValueError(f"unknown normalization {kind!r}; expected one of {NORMS}")


def make_model(kind: str, data: Split, config: SmallBatchConfig) -> nn.Sequential:
    h = config.hidden
    return nn.Sequential(
        nn.Linear(data.num_features, h, bias=False),
        make_norm(kind, h, config),
        nn.ReLU(),
        nn.Linear(h, h, bias=False),
        make_norm(kind, h, config),
        nn.ReLU(),
        nn.Linear(h, data.num_classes),
    )


def train_one(
    kind: str, batch_size: int, seed: int, data: Split, config: SmallBatchConfig
) -> float:
    """Test accuracy after ``config.epochs`` epochs of SGD at ``batch_size``."""
    torch.manual_seed(seed)
    model = make_model(kind, data, config)
    lr = config.lr * min(1.0, batch_size / 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.sgd_momentum)
    generator = torch.Generator().manual_seed(seed)
    steps = config.epochs * len(data.train_y) // batch_size
    for _ in range(steps):
        batch = torch.randint(len(data.train_y), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return accuracy(model, data.test_x, data.test_y)


def run(config: SmallBatchConfig, progress: bool = False) -> list[dict]:
    """One row per (norm, batch size, seed): its test accuracy."""
    from tqdm import tqdm

    unknown = [kind for kind in config.norms if kind not in NORMS]
    if unknown:  # fail before any training
        raise ValueError(f"unknown normalization(s) {unknown}; expected some of {NORMS}")
    data = load_data(config.dataset, config.data_dir)
    grid = [(k, b, s) for b in config.batch_sizes for k in config.norms for s in config.seeds]
    rows = []
    bar = tqdm(grid, disable=not progress, desc="small-batch")
    for kind, batch_size, seed in bar:
        acc = train_one(kind, batch_size, seed, data, config)
        rows.append({"norm": kind, "batch_size": batch_size, "seed": seed, "test_accuracy": acc})
        bar.set_postfix(norm=kind, batch=batch_size, acc=f"{acc:.3f}")
    return rows


def mean_accuracy(rows: list[dict]) -> dict[tuple[str, int], float]:
    """The test accuracy of each (norm, batch size), averaged over the seeds run."""
    cells: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        cells.setdefault((row["norm"], row["batch_size"]), []).append(row["test_accuracy"])
    return {key: mean(values) for key, values in cells.items()}


@dataclass
class SmallBatchSummary:
    """Every number the small-batch report quotes, computed once from the rows."""

    batch_sizes: tuple[int, ...]
    norms: tuple[str, ...]  # the norms finished at every batch size, in the config's order
    means: dict[tuple[str, int], float]  # (norm, batch size) -> mean test accuracy over seeds
    bn_gain_points: Optional[float]  # BN at the largest batch minus at the smallest, in points

    @property
    def smallest(self) -> int:
        return min(self.batch_sizes)

    @property
    def largest(self) -> int:
        return max(self.batch_sizes)

    def headline(self) -> dict[str, float]:
        """summary.json: the mean accuracy of every finished cell, keyed "norm@batch"."""
        return {f"{k}@{b}": self.means[k, b] for k in self.norms for b in self.batch_sizes}


def summarize(rows: list[dict], config: SmallBatchConfig) -> SmallBatchSummary:
    """The mean accuracies of the rows (one per job: its end) and BN's small-to-large gain."""
    means = mean_accuracy(rows)
    sizes = config.batch_sizes
    done = tuple(k for k in config.norms if all((k, b) in means for b in sizes))
    gain = 100 * means["bn", max(sizes)] - 100 * means["bn", min(sizes)] if "bn" in done else None
    return SmallBatchSummary(sizes, done, means, gain)


def write_outputs(rows: list[dict], config: SmallBatchConfig, out_dir: Path) -> Path:
    """config.json, metrics.csv, metrics.json, accuracy.png and report.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    summary = summarize(rows, config)
    plot(summary, config, out_dir / "accuracy.png")
    report = out_dir / "report.md"
    report.write_text(render(summary, config))
    return report


def plot(s: SmallBatchSummary, config: SmallBatchConfig, path: Path) -> None:
    """Mean test accuracy against the batch size (log2), one curve per finished norm."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for kind in s.norms:
        ax.plot(
            s.batch_sizes, [100 * s.means[kind, b] for b in s.batch_sizes], "o-", label=LABELS[kind]
        )
    batch_size_axes(
        ax, s.batch_sizes, f"Digits MLP, {config.epochs} epochs, {len(config.seeds)} seed(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def render(s: SmallBatchSummary, config: SmallBatchConfig) -> str:
    """report.md: the setup, the accuracy table by norm and batch size, the findings."""
    lines = [
        "# Small batches: test accuracy (%) by examples per batch",
        "",
        f"Bundled 8x8 digits, MLP 64-{config.hidden}-{config.hidden}-10 with the normalization "
        f"after each hidden Linear, {config.epochs} epochs of SGD (momentum "
        f"{config.sgd_momentum}, lr {config.lr} scaled linearly below batch 32), mean over seeds "
        f"{list(config.seeds)}.",
        "",
        *table(
            ["normalization", *map(str, s.batch_sizes)],
            [[LABELS[k], *[pct(s.means[k, b]) for b in s.batch_sizes]] for k in s.norms],
        ),
    ]
    lines += ["", *_findings(s, config), "", "![accuracy by batch size](accuracy.png)", ""]
    return "\n".join(lines)


def _findings(s: SmallBatchSummary, config: SmallBatchConfig) -> list[str]:
    if s.bn_gain_points is None:
        return []
    small, large = s.smallest, s.largest
    lines = [
        f"- BatchNorm: {pct(s.means['bn', small])}% at batch {small} against "
        f"{pct(s.means['bn', large])}% at batch {large} "
        f"({s.bn_gain_points:+.1f} points from small to large)."
    ]
    for kind in (k for k in s.norms if k != "bn"):
        lines.append(
            f"- {LABELS[kind]}: {pct(s.means[kind, small])}% at batch {small}, "
            f"{pct(s.means[kind, large])}% at batch {large}."
        )
    if "ghost" in s.norms:
        lines.append(
            "- GhostBatchNorm is plain BN at batches up to "
            f"{2 * config.virtual_batch_size - 1} (one virtual batch): it targets large "
            "batches, not small ones."
        )
    return lines


# ------------------------------------------------------------------------------------------------
# The lab framework: bnlab run small-batch
# ------------------------------------------------------------------------------------------------


def _framework_report(view: RunView) -> Report:
    summary = summarize(view.rows, view.config)
    if not summary.norms:
        return Report("# Small batches\n\nNo finished norm yet.\n", {})
    plot(summary, view.config, view.plot_path("accuracy.png"))
    return Report(render(summary, view.config), summary.headline())


@experiment("small-batch", SmallBatchConfig, _framework_report)
def small_batch(run_: Run) -> None:
    """BN vs batch renorm vs ghost BN vs layer norm vs group norm by batch size (Wu & He 2018)."""
    config: SmallBatchConfig = run_.config
    data = load_data(config.dataset, config.data_dir)
    grid = [(k, b, s) for b in config.batch_sizes for k in config.norms for s in config.seeds]
    run_.total_jobs = len(grid)
    for kind, batch_size, seed in grid:
        lr = config.lr * min(1.0, batch_size / 32)
        train_on_split(
            run_,
            f"{kind}/b={batch_size}/seed={seed}",
            data,
            build=lambda kind=kind: make_model(kind, data, config),
            optimizer=lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=config.sgd_momentum),
            steps=config.epochs * len(data.train_y) // batch_size,
            batch_size=batch_size,
            seed=seed,
            batch_seed=seed,
            tags={"norm": kind, "batch_size": batch_size, "seed": seed},
        )
