"""Ioffe & Szegedy 2015, Figure 1: the MNIST sigmoid MLP with and without batch normalization.

The network of the paper's section 4.1: 3 fully connected hidden layers of 100 sigmoid units,
weights from a small Gaussian, a 10-way softmax with cross-entropy, mini-batches of 60, 50,000
steps; once as is and once with BN on every hidden layer (before the sigmoid; BN's beta replaces
the Linear's bias). Figure 1 (a): test accuracy against steps; (b, c): the {15, 50, 85}th
percentiles of one last-hidden-layer sigmoid's input over training, without and with BN.

The paper gives no optimizer or learning rate. We use plain SGD (no momentum, no weight decay) at
lr 0.5 for both nets, dropped once to 0.05 for the last 20% of the steps: at that rate the plain
net learns, slowly at first as in the paper's plot (it needs a few thousand steps to leave the
plateau that the 0.01-std init puts it on), while the BN net is high after a few hundred steps.
Much lower rates leave the plain net stuck near chance for tens of thousands of steps; much higher
ones make the curves noisy. The final drop lets both nets settle (on MNIST, 0.979-0.981 for the
BN net over steps 30k-50k at a constant 0.5; the drop adds about 0.2 points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..diagnostics import ActivationPercentiles, band_drift
from .common import NETS, check_positive, load_data, train_as_configured
from .datasets import DatasetConfig, by_dataset
from .mlp import sigmoid_mlp
from .reports import pct, pyplot, save, staged_report, table
from .runner import Run, RunView, experiment
from .schedules import describe_schedule, drop_step, lr_at_step

PAPER_STEPS = 50_000
DIGITS_STEPS = 15_000
CHANCE = 0.1  # test accuracy of guessing: both datasets have ten classes of about equal size


@dataclass
class Fig1Config(DatasetConfig):
    steps: Optional[int] = None  # SGD steps per net; None: mnist 50,000 (the paper), digits 15,000
    batch_size: int = 60  # the paper's mini-batch
    lr: float = 0.5  # plain SGD, both nets (the paper gives none; the report says why 0.5)
    lr_drop_at: Optional[float] = 0.8  # rate *= lr_drop past this fraction of steps; None: constant
    lr_drop: float = 0.1  # the factor of that one final drop
    hidden: int = 100  # sigmoid units per hidden layer
    depth: int = 3  # hidden layers
    init_std: float = 0.01  # the "small random Gaussian" weights: N(0, init_std^2), zero biases
    eval_every: Optional[int] = None  # steps between full test-set evaluations; None: steps / 100
    unit: int = 0  # which of the last hidden layer's sigmoid inputs figures (b, c) follow
    percentiles: tuple[float, ...] = (15.0, 50.0, 85.0)  # band of figures (b, c): low, middle, high
    drift_from: Optional[int] = None  # band drift also from here; None: 1,000 (mnist) or steps / 50
    ahead_from: Optional[int] = None  # BN lead checked from here; None: 5,000 (mnist) or steps / 10
    seed: int = 0  # initialization (both nets) and the mini-batch order (shared by both nets)
    checkpoint_every: int = 1000  # steps between checkpoints (0: none)

    def resolve(self) -> "Fig1Config":
        steps = by_dataset(self.steps, self.dataset, DIGITS_STEPS, PAPER_STEPS)
        c = replace(
            self,
            steps=steps,
            eval_every=self.eval_every or max(1, steps // 100),
            drift_from=by_dataset(self.drift_from, self.dataset, steps // 50, 1000),
            ahead_from=by_dataset(self.ahead_from, self.dataset, steps // 10, 5000),
        )
        check_positive(c, "steps", "batch_size", "lr", "hidden", "depth", "init_std", "eval_every")
        if len(c.percentiles) != 3 or list(c.percentiles) != sorted(c.percentiles):
            raise ValueError(f"percentiles must be three increasing values, got {c.percentiles}")
        if c.lr_drop_at is not None and not (0 < c.lr_drop_at <= 1 and c.lr_drop > 0):
            raise ValueError(
                f"lr_drop_at must be in (0, 1] and lr_drop > 0, got {c.lr_drop_at}, {c.lr_drop}"
            )
        if not 0 <= c.unit < c.hidden:
            raise ValueError(f"unit must be in [0, hidden={c.hidden}), got {c.unit}")
        return c


@dataclass
class AccuracySummary:
    """Figure 1 (a) in numbers: both nets' test accuracy, compared evaluation by evaluation."""

    finals: dict[str, float]  # net -> final test accuracy
    milestones: list[tuple[int, dict[str, float]]]  # the table: (step, net -> test accuracy)
    ahead_from: int  # BN's lead is checked at every evaluation from this step on
    evaluations_from: int  # how many evaluations both nets have from that step on
    bn_behind_at: list[int]  # the steps among them where BN is not above the baseline
    first_at_90: dict[str, Optional[int]]  # net -> first evaluated step at >= 90% (None: never)
    diverged: bool  # a net's loss went non-finite


@dataclass
class DriftComparison:
    """Figure 1 (b, c) in one sentence: how far each net's band moved from ``drift_from`` on."""

    baseline: dict[str, float]  # band_drift of the net without BN
    bn: dict[str, float]  # band_drift of the net with BN
    median_range_ratio: Optional[float]  # baseline's / BN's (None: BN's range is 0)
    spread_range_ratio: Optional[float]

    @property
    def baseline_drifts_more(self) -> bool:
        return bool(
            self.baseline["median_range"] > self.bn["median_range"]
            and self.baseline["spread_range"] > self.bn["spread_range"]
        )


@dataclass
class Fig1Summary:
    """Every number the Figure 1 report quotes, computed once from the run's rows."""

    dataset: str
    steps: int
    accuracy: Optional[AccuracySummary]  # None until both nets have rows
    drifts: list[tuple[str, int, dict[str, float]]]  # (net, from step, band_drift) per table row
    comparison: Optional[DriftComparison]
    seconds: dict[str, float]  # net -> training time
    threads: Any
    torch: Any

    def headline(self) -> dict[str, Any]:
        """summary.json: the final accuracies, BN's lead, the drift of each band."""
        out: dict[str, Any] = {"dataset": self.dataset, "steps": self.steps}
        a = self.accuracy
        if a is not None:
            out.update({f"final_accuracy_{net}": a.finals[net] for net, _ in NETS})
            out["bn_ahead_from"] = a.ahead_from
            out["bn_ahead_at_every_evaluation"] = not a.bn_behind_at
            out.update({f"first_step_at_90_{net}": a.first_at_90[net] for net, _ in NETS})
        out.update({f"drift_{net}_from_{start}": d for net, start, d in self.drifts})
        if self.comparison is not None:
            out["baseline_drifts_more"] = self.comparison.baseline_drifts_more
        return out


def summarize(view: RunView) -> Fig1Summary:
    """The report's numbers from the run's rows and its timings."""
    c: Fig1Config = view.config
    curves = {net: view.job_rows(net) for net, _ in NETS}
    drifts = _band_drifts(curves, c)
    latest = {net: d for net, _, d in drifts}  # from drift_from, or from 0 where that is the same
    baseline, bn = latest.get("plain"), latest.get("bn")
    return Fig1Summary(
        dataset=c.dataset,
        steps=c.steps,
        accuracy=_accuracy_summary(curves, c) if all(curves.values()) else None,
        drifts=drifts,
        comparison=_compare_drifts(baseline, bn) if baseline and bn else None,
        seconds=view.info.get("job_seconds", {}),
        threads=view.info.get("threads", "?"),
        torch=view.info.get("torch", "?"),
    )


def _accuracy_summary(curves: dict[str, list[dict]], c: Fig1Config) -> AccuracySummary:
    acc = {net: {r["step"]: r["test_accuracy"] for r in curves[net]} for net, _ in NETS}
    marks = sorted(acc["bn"].keys() & acc["plain"].keys())
    wanted = [m for m in marks if m in _milestones(c.steps)] or marks[-1:]
    later = [m for m in marks if m >= c.ahead_from]
    return AccuracySummary(
        finals={net: curves[net][-1]["test_accuracy"] for net, _ in NETS},
        milestones=[(m, {net: acc[net][m] for net, _ in NETS}) for m in wanted],
        ahead_from=c.ahead_from,
        evaluations_from=len(later),
        bn_behind_at=[m for m in later if not acc["bn"][m] > acc["plain"][m]],
        first_at_90={
            net: next((r["step"] for r in curves[net] if r["test_accuracy"] >= 0.9), None)
            for net, _ in NETS
        },
        diverged=any(r["diverged"] for net, _ in NETS for r in curves[net]),
    )


def _band_drifts(curves: dict[str, list[dict]], c: Fig1Config) -> list[tuple[str, int, dict]]:
    """band_drift of each net from step 0 and from ``drift_from`` (where it has a band there).

    The band starts at the first evaluation after step 0, so in a short run ``drift_from`` can
    fall at or before it: both starts then compare the same evaluations, and the row is given
    once (from 0)."""
    lo, mid, hi = _band_keys(c)
    drifts = []
    for net, _ in NETS:
        history = _band_rows(curves[net], mid)
        first_steps = set()
        for start in sorted({0, c.drift_from}):
            try:
                drift = band_drift(history, lo, mid, hi, start_step=start)
            except ValueError:
                continue
            if drift["first_step"] not in first_steps:
                first_steps.add(drift["first_step"])
                drifts.append((net, start, drift))
    return drifts


def _compare_drifts(baseline: dict[str, float], bn: dict[str, float]) -> DriftComparison:
    def ratio(x: float, y: float) -> Optional[float]:
        return x / y if y > 0 else None

    return DriftComparison(
        baseline,
        bn,
        ratio(baseline["median_range"], bn["median_range"]),
        ratio(baseline["spread_range"], bn["spread_range"]),
    )


def _band_keys(c: Fig1Config) -> tuple[str, str, str]:
    """The history keys of the low, middle and high percentile, e.g. ("p15", "p50", "p85")."""
    lo, mid, hi = (ActivationPercentiles.key(p) for p in c.percentiles)
    return lo, mid, hi


def plot(view: RunView, summary: Fig1Summary) -> None:
    """fig1.png: (a) both nets' test accuracy, (b, c) the sigmoid-input band of each net (every
    evaluation: the curves come from the rows, not the summary's milestones). Every panel has its
    y label, the rate drop as a labelled vertical line, and its legend below the axes, where it
    cannot cover a curve."""
    c: Fig1Config = view.config
    curves = {net: view.job_rows(net) for net, _ in NETS}
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 5))
    _plot_accuracy(axes[0], curves)
    _plot_bands(axes[1:], curves, c)
    for ax in axes:
        _mark_rate_drop(ax, c)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.suptitle(
        f"Ioffe & Szegedy 2015, Figure 1 at lab scale: {c.dataset}, {c.steps:,} steps, "
        f"SGD {describe_schedule(c)}, batch {c.batch_size}"
    )
    save(fig, view.plot_path("fig1.png"))


def _mark_rate_drop(ax, c: Fig1Config) -> None:
    """A dotted vertical line after the last step at the full rate, named in the legend and
    labelled above the axes (outside them: the label covers no curve)."""
    drop = drop_step(c)
    if drop is None or drop >= c.steps:
        return
    label = f"lr x{c.lr_drop:g} after step {drop:,}"
    ax.axvline(drop, color="0.35", linestyle=":", linewidth=1.2, label=label)
    ax.text(
        drop,
        1.0,
        f"lr x{c.lr_drop:g}",
        transform=ax.get_xaxis_transform(),  # x in steps, y in axes fractions
        ha="center",
        va="bottom",
        fontsize=8,
        color="0.35",
    )


def _plot_accuracy(ax, curves: dict[str, list[dict]]) -> None:
    for net, label in NETS:
        rows = curves[net]
        ax.plot([r["step"] for r in rows], [r["test_accuracy"] for r in rows], label=label)
    ax.set_title("(a) test accuracy", fontsize=10, pad=14)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (full test set, eval mode)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)


# the percentile lines of panels (b, c): (position in the band, line style, legend name)
_BAND_LINES = ((0, ":", "{}th percentile"), (1, "-", "{}th (median)"), (2, "--", "{}th percentile"))


def _plot_bands(axes, curves: dict[str, list[dict]], c: Fig1Config) -> None:
    """Panels (b) and (c) on one y scale, so that the two bands' widths compare at a glance."""
    keys = _band_keys(c)
    ylim = [math.inf, -math.inf]
    for ax, (net, label), panel in zip(axes, NETS, "bc"):
        rows = _band_rows(curves[net], keys[1])
        steps = [r["step"] for r in rows]
        color = "C0" if net == "plain" else "C1"
        for position, style, name in _BAND_LINES:
            values = [r[keys[position]] for r in rows]
            ax.plot(
                steps, values, style, color=color, label=name.format(f"{c.percentiles[position]:g}")
            )
            if values:
                ylim = [min(ylim[0], min(values)), max(ylim[1], max(values))]
        ax.set_title(f"({panel}) {label}: sigmoid input of unit {c.unit}", fontsize=10, pad=14)
        ax.set_xlabel("step")
        ax.set_ylabel("pre-activation W u" if net == "plain" else "BN output (gamma xhat + beta)")
        ax.grid(alpha=0.3)
    if math.isfinite(ylim[0]):
        pad = 0.05 * (ylim[1] - ylim[0] or 1.0)
        for ax in axes:
            ax.set_ylim(ylim[0] - pad, ylim[1] + pad)


def _percentile_names(c: Fig1Config) -> str:
    return "/".join(f"{p:g}" for p in c.percentiles)


def render(s: Fig1Summary, c: Fig1Config) -> str:
    """report.md: the setup, figure, accuracy findings, drift table and timings of the summary."""
    lines = _setup_lines(c)
    if s.accuracy is not None:
        lines += _accuracy_lines(s.accuracy, s.steps)
    lines += _drift_lines(s, c)
    if s.seconds:
        lines += [
            "",
            "Training time: "
            + ", ".join(
                f"{label} {s.seconds[net]:.0f} s" for net, label in NETS if net in s.seconds
            )
            + f" ({s.threads} thread(s), torch {s.torch}).",
        ]
    lines.append("")
    return "\n".join(lines)


def _setup_lines(c: Fig1Config) -> list[str]:
    steps_note = ""
    if c.dataset == "digits" and c.steps != PAPER_STEPS:
        why = (
            "the default, which keeps `make demo` within its 3-minute budget"
            if c.steps == DIGITS_STEPS
            else "`--steps`"
        )
        steps_note = (
            f" The paper trains for {PAPER_STEPS:,} steps on MNIST; on the bundled digits "
            f"(1,437 training images) this run uses {c.steps:,} ({why}); how far each net got "
            "in them is under (a)."
        )
    return [
        "# Figure 1 of Ioffe & Szegedy (2015) at lab scale",
        "",
        f"Dataset **{c.dataset}**; MLP with {c.depth} hidden layers of {c.hidden} sigmoid units, "
        f"N(0, {c.init_std:g}^2) weights, softmax cross-entropy, mini-batches of {c.batch_size}, "
        f"{c.steps:,} steps of plain SGD ({describe_schedule(c)}; no momentum, no weight decay; "
        "the paper gives no optimizer or rate: see below), seed "
        f"{c.seed}; with BN, every hidden layer is Linear (no bias) -> BatchNorm1d -> sigmoid. "
        f"Test accuracy on the full test set every {c.eval_every:,} steps, in eval mode "
        "(BN uses its running statistics)." + steps_note,
        "",
        "![Figure 1](fig1.png)",
        "",
        "Why this optimizer: at lr 0.5 the plain net learns as in the paper's plot, slowly at "
        "first (the 0.01-std init holds it on a plateau for a few thousand steps), while the BN "
        "net is high within a few hundred steps; much lower rates leave the plain net near chance "
        "for tens of thousands of steps, higher ones make both curves noisy. The one final drop of "
        "the rate (x0.1 for the last 20% of the steps) lets both nets settle: on MNIST it is worth "
        "about 0.2 points to the BN net.",
        "",
    ]


def _progress_lines(a: AccuracySummary, steps: int) -> list[str]:
    """Where each net got by the end of the run, in words chosen by its numbers: near chance
    (below twice chance), short of 90%, or there."""
    lines = []
    for net, label in NETS:
        final = a.finals[net]
        if final < 2 * CHANCE:
            lines.append(
                f"- {label}, the net is still near chance at the end ({pct(final)}%; chance is "
                f"{pct(CHANCE)}%): {steps:,} steps did not take it off the plateau of its small "
                "initial weights; a longer run (`--steps`) shows whether and when it learns."
            )
        elif a.first_at_90[net] is None:
            lines.append(
                f"- {label}, the net learns but stays below 90% within the run (final "
                f"{pct(final)}%): a longer run (`--steps`) shows where it settles."
            )
    if not lines:
        lines.append("- Both nets reached 90% test accuracy within the run.")
    return lines


def _accuracy_lines(a: AccuracySummary, steps: int) -> list[str]:
    lines = ["## (a) Test accuracy", ""]
    lines += table(
        ["step", *[label for _, label in NETS]],
        [[f"{m:,}", *[pct(acc[net]) for net, _ in NETS]] for m, acc in a.milestones],
    )
    lines += [
        "",
        f"- Final test accuracy: without BN {pct(a.finals['plain'])}%, "
        f"with BN {pct(a.finals['bn'])}%.",
    ]
    if a.evaluations_from:
        behind = a.bn_behind_at
        ahead = a.evaluations_from - len(behind)
        lines.append(
            f"- BN is above the baseline at every evaluation from step {a.ahead_from:,} on "
            f"({ahead} of {a.evaluations_from} evaluations)."
            if not behind
            else f"- BN is above the baseline at {ahead} of the {a.evaluations_from} evaluations "
            f"from step {a.ahead_from:,} on (not at step(s) "
            f"{', '.join(f'{m:,}' for m in behind[:5])}{', ...' if len(behind) > 5 else ''})."
        )
    for net, label in NETS:
        first = a.first_at_90[net]
        lines.append(
            f"- {label}: first evaluation at >= 90% test accuracy: "
            + (f"step {first:,}." if first is not None else "never.")
        )
    lines += _progress_lines(a, steps)
    if a.diverged:
        lines.append("- A net diverged (non-finite loss): see metrics.json.")
    return lines


def _drift_lines(s: Fig1Summary, c: Fig1Config) -> list[str]:
    lo, mid, hi = _band_keys(c)
    lines = [
        "",
        "## (b, c) Drift of the sigmoid-input distribution",
        "",
        f"Unit {c.unit} of the last hidden layer: its sigmoid input (the pre-activation W u "
        "without BN, the BN output with BN) over the full test set at every evaluation, "
        f"summarized by its {_percentile_names(c)}th percentiles. "
        f'"Spread" is {hi} - {lo}; "change" is last minus first; "range" is max minus '
        "min over the evaluations compared. The bands start at the first evaluation after "
        "step 0: before any training step the BN net's running statistics are still their "
        "initial values (mean 0, variance 1) and describe no data.",
        "",
    ]
    if not s.drifts:
        return lines
    lines += table(
        [
            "net",
            "steps",
            f"{mid}",
            f"{mid} change",
            f"{mid} range",
            "spread",
            "spread change",
            "spread range",
        ],
        [_drift_row(dict(NETS)[net], d) for net, _, d in s.drifts],
    )
    if s.comparison is not None:
        lines += ["", _comparison_text(s.comparison)]
    return lines


def _drift_row(label: str, d: dict[str, float]) -> list[str]:
    return [
        label,
        f"{d['first_step']:,} -> {d['last_step']:,}",
        f"{d['median_first']:+.3f} -> {d['median_last']:+.3f}",
        f"{d['median_change']:+.3f}",
        f"{d['median_range']:.3f}",
        f"{d['spread_first']:.3f} -> {d['spread_last']:.3f}",
        f"{d['spread_change']:+.3f}",
        f"{d['spread_range']:.3f}",
    ]


def _comparison_text(k: DriftComparison) -> str:
    a, b = k.baseline, k.bn

    def times(ratio: Optional[float]) -> str:
        return "inf" if ratio is None else f"{ratio:.1f}x"

    return (
        f"From step {a['first_step']:,} to the end, the baseline's median moved "
        f"{abs(a['median_change']):.3f} (range {a['median_range']:.3f}) and its spread "
        f"{abs(a['spread_change']):.3f} (range {a['spread_range']:.3f}); with BN the median "
        f"moved {abs(b['median_change']):.3f} (range {b['median_range']:.3f}) and the spread "
        f"{abs(b['spread_change']):.3f} (range {b['spread_range']:.3f}): the baseline's "
        f"median range is {times(k.median_range_ratio)} and its spread range "
        f"{times(k.spread_range_ratio)} BN's."
    )


def _band_rows(rows: list[dict], mid: str) -> list[dict]:
    return [r for r in rows if r["step"] > 0 and r.get(mid) is not None and math.isfinite(r[mid])]


def _milestones(steps: int) -> set[int]:
    marks = {steps}
    for m in (500, 1000, 2000, 5000, 10_000, 20_000, 30_000, 40_000, 50_000):
        if m < steps:
            marks.add(m)
    marks |= {round(steps * f) for f in (0.1, 0.25, 0.5, 0.75)}
    return marks


@experiment("fig1", Fig1Config, staged_report(summarize, plot, render))
def fig1(run: Run) -> None:
    """The paper's Figure 1: a sigmoid MLP with and without BN, accuracy and sigmoid-input drift."""
    c: Fig1Config = run.config
    data = load_data(c.dataset, c.data_dir)
    run.total_jobs = len(NETS)
    for net, _ in NETS:

        def build(net=net):
            return sigmoid_mlp(
                data.num_features,
                data.num_classes,
                hidden=c.hidden,
                depth=c.depth,
                batch_norm=net == "bn",
                init_std=c.init_std,
            )

        band = _SigmoidInputBand(c)
        train_as_configured(
            run,
            net,
            data,
            c,
            build=build,
            optimizer=lambda params: torch.optim.SGD(params, lr=c.lr),
            eval_at_start=True,
            tags={"net": net},
            hooks=band.attach,
            lr_at=lambda i: lr_at_step(c, i),
            extra_eval=band.record,
        )


class _SigmoidInputBand:
    """The percentiles of one last-hidden-layer sigmoid input, recorded at every evaluation."""

    def __init__(self, c: Fig1Config) -> None:
        self.config = c
        self.tracker: Optional[ActivationPercentiles] = None

    def attach(self, model: torch.nn.Module) -> dict:
        """Hook the model's last sigmoid; the tracker is checkpointed with the job."""
        last_sigmoid = [m for m in model if isinstance(m, torch.nn.Sigmoid)][-1]
        self.tracker = ActivationPercentiles(
            last_sigmoid,
            unit=self.config.unit,
            percentiles=self.config.percentiles,
            capture="input",
        )
        return {"tracker": self.tracker}

    def record(self, step: int, model: torch.nn.Module) -> dict:
        """The evaluation row's percentile columns (the test forward has just filled them)."""
        return {k: v for k, v in self.tracker.record(step).items() if k != "step"}
