"""Plots and a Markdown table from bn_speed.csv: one run (the latest of one machine) at a time.

    python benchmarks/plot_bn_speed.py
    # -> results/bn_speed_speedup.png, bn_speed_copies.png, bn_speed.md

- ``bn_speed_speedup.png``: the speed-up over torch.nn per case (the median over the interleaved
  rounds of each round's ratio, or median(torch.nn) / median(provider) for runs without it), one
  panel per mode; the error bars put the provider's p80 and p20 in place of its median.
- ``bn_speed_copies.png``: copy-equivalents (median / copy median of the same run) for fwd and full,
  with the acceptance limits 2.5 and 6 drawn.
- ``bn_speed.md``: the speedup tables, the copy-equivalents and the acceptance checks of issue 3.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from bn_speed import MODES, speedup_table  # noqa: E402
from bn_speed import speedup as paired_or_median  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMPARED = ["bnlab", "bnlab-torch", "compile"]  # each against torch.nn
COPY_LIMITS = {"fwd": 2.5, "full": 6.0}
ACCEPT_SHAPES = ["64x64x56x56", "256x256x14x14", "128x32x32x32", "4096x1024"]  # contiguous, fp32
ACCEPT_SPEEDUP = {"fwd": 4.0, "full": 3.0, "bnrelu": 4.0, "eval": 1.0}
ACCEPT_COPIES_SHAPES = ACCEPT_SHAPES[:3]
NO_SLOWER_THAN = 0.9  # no case more than 10% slower than torch.nn


def select_run(rows: list[dict], machine: str | None) -> list[dict]:
    """The latest run of ``machine`` (a substring; default: the machine of the newest row)."""
    if machine:
        rows = [r for r in rows if machine in r["machine"]]
    if not rows:
        raise click.ClickException(f"no rows for machine {machine!r}")
    newest = max(rows, key=lambda r: r["run"])["machine"]
    rows = [r for r in rows if r["machine"] == newest]
    last = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == last]


def index(rows: list[dict]) -> dict[tuple, dict]:
    """(shape, layout, dtype, mode, provider) -> row, for the rows that ran."""
    return {
        (r["shape"], r["layout"], r["dtype"], r["mode"], r["provider"]): r
        for r in rows
        if r["status"] == "ok"
    }


def cases(rows: list[dict]) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys((r["shape"], r["layout"], r["dtype"]) for r in rows))


def case_label(case: tuple[str, str, str]) -> str:
    shape, layout, dtype = case
    return (
        f"{shape}\n{'CL' if layout == 'channels_last' else 'contig'} {dtype.replace('float', 'f')}"
    )


def speedup(by: dict, case: tuple, mode: str, provider: str) -> tuple[float, float, float] | None:
    """The provider's speed-up over torch.nn (paired per-round ratio where the run has it, see
    bn_speed.speedup), with torch.nn's median over the provider's p80 and p20 as the spread (None
    where either did not run)."""
    base, r = by.get((*case, mode, "torch")), by.get((*case, mode, provider))
    if not (base and r):
        return None
    t, mid = float(base["median_ms"]), paired_or_median(r, base)
    # the spread is around the pooled median; the paired ratio may fall outside it
    return mid, min(mid, t / float(r["p80_ms"])), max(mid, t / float(r["p20_ms"]))


def grouped_bars(ax, labels, series: dict[str, list], ylabel: str) -> None:
    """Bars per label, one colour per series; each value (mid, low, high) or None. Series with no
    value at all (a provider not in this run) are left out, legend included."""
    series = {name: values for name, values in series.items() if any(values)}
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v]
        mids = [v[0] for v in values if v]
        err = [[v[0] - v[1] for v in values if v], [v[2] - v[0] for v in values if v]]
        ax.bar(xs, mids, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))


def plot_speedups(rows: list[dict], out: Path) -> Path:
    by, all_cases = index(rows), cases(rows)
    modes = [m for m in MODES if any(k[3] == m for k in by)]
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(8, 0.7 * len(all_cases)), 2.6 * len(modes)), squeeze=False
    )
    for ax, mode in zip(axes[:, 0], modes):
        series = {p: [speedup(by, c, mode, p) for c in all_cases] for p in COMPARED}
        grouped_bars(ax, [case_label(c) for c in all_cases], series, f"{mode}: x torch.nn")
        ax.axhline(1.0, color="gray", lw=0.8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(
        f"Speed vs torch.nn (higher is faster), CPU ({rows[0]['machine']})", fontsize=9
    )
    return save(fig, out / "bn_speed_speedup.png")


def copies(by: dict, case: tuple, mode: str, provider: str) -> tuple[float, float, float] | None:
    r = by.get((*case, mode, provider))
    if not r:
        return None
    copy_ms = float(r["copy_ms"])
    return tuple(float(r[k]) / copy_ms for k in ("median_ms", "p20_ms", "p80_ms"))


def plot_copies(rows: list[dict], out: Path) -> Path:
    by, all_cases = index(rows), cases(rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(all_cases)), 6), squeeze=False)
    for ax, (mode, limit) in zip(axes[:, 0], COPY_LIMITS.items()):
        series = {p: [copies(by, c, mode, p) for c in all_cases] for p in ["torch", *COMPARED]}
        grouped_bars(ax, [case_label(c) for c in all_cases], series, f"{mode}: copy-equivalents")
        ax.axhline(limit, color="red", lw=0.8, ls="--", label=f"limit {limit}")
        ax.legend(fontsize=7)
    axes[0, 0].set_title(
        f"Time in copies of the input (lower is better), CPU ({rows[0]['machine']})", fontsize=9
    )
    return save(fig, out / "bn_speed_copies.png")


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def copies_table(rows: list[dict]) -> str:
    """Markdown: copy ms, and copy-equivalents of bnlab and torch.nn in fwd and full, per case."""
    by = index(rows)
    lines = [
        "| shape | layout | dtype | copy ms | clone ms | bnlab fwd | torch fwd | bnlab full "
        "| torch full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases(rows):
        copy, clone = by.get((*case, "copy", "copy")), by.get((*case, "clone", "copy"))
        cells = [
            f"{float(copy['median_ms']):.4f}" if copy else "-",
            f"{float(clone['median_ms']):.4f}" if clone else "-",
        ]
        for mode in COPY_LIMITS:
            for provider in ("bnlab", "torch"):
                c = copies(by, case, mode, provider)
                cells.append(f"{c[0]:.2f}" if c else "-")
        lines.append(f"| {' | '.join(case)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(rows: list[dict]) -> list[str]:
    """Issue 3's speed criteria, each with the measured value; missing cases are said so."""
    by, checks = index(rows), []
    for shape in ACCEPT_SHAPES:
        for mode, need in ACCEPT_SPEEDUP.items():
            s = speedup(by, (shape, "contiguous", "float32"), mode, "bnlab")
            checks.append(
                verdict(f"{shape} {mode} speedup >= {need}", s and s[0], s and s[0] >= need)
            )
    for shape in ACCEPT_COPIES_SHAPES:
        for mode, limit in COPY_LIMITS.items():
            c = copies(by, (shape, "contiguous", "float32"), mode, "bnlab")
            checks.append(
                verdict(
                    f"{shape} {mode} copy-equivalents <= {limit}", c and c[0], c and c[0] <= limit
                )
            )
    worst = min(
        (
            (s[0], case, mode)
            for case in cases(rows)
            for mode in MODES
            if (s := speedup(by, case, mode, "bnlab"))
        ),
        default=None,
    )
    if worst:
        label = f"slowest case {' '.join(worst[1])} {worst[2]} >= {NO_SLOWER_THAN}x torch.nn"
        checks.append(verdict(label, worst[0], worst[0] >= NO_SLOWER_THAN))
    return checks


def acceptance_text(rows: list[dict]) -> str:
    checks = acceptance(rows)
    missing = [c for c in checks if c.startswith("- not measured")]
    lines = [c for c in checks if c not in missing]
    if missing:
        lines.append(
            f"- not measured: {len(missing)} check(s) whose shapes or modes this run lacks"
        )
    return "\n".join(lines)


def verdict(label: str, value: float | None, ok: bool | None) -> str:
    if value is None:
        return f"- not measured: {label}"
    return f"- {'pass' if ok else 'FAIL'}: {label} (measured {value:.2f})"


def markdown(rows: list[dict]) -> str:
    r = rows[0]
    failed = sorted(
        {f"{x['mode']}/{x['provider']}: {x['status']}" for x in rows if x["status"] != "ok"}
    )
    parts = [
        f"Batch-norm speed, CPU ({r['machine']}; run {r['run']}; median of "
        "torch.utils.benchmark blocked runs)",
        "\nbnlab over torch.nn (median over the rounds of each round's ratio, higher is faster):\n",
        speedup_table(rows),
        "\ntorch.compile of torch.nn over torch.nn:\n",
        speedup_table(rows, "compile"),
        "\nCopy-equivalents (median / median of dst.copy_(x) in the same run; clone = "
        "x.clone(), a copy that allocates):\n",
        copies_table(rows),
        "\nAcceptance (issue 3, float32, contiguous):\n",
        acceptance_text(rows),
    ]
    if failed:
        parts += ["\nDid not run:\n", "\n".join(f"- {f}" for f in failed)]
    return "\n".join(parts) + "\n"


@click.command()
@click.option("--csv", "csv_path", default=str(RESULTS / "bn_speed.csv"), show_default=True)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for the PNGs and bn_speed.md (default: the CSV's directory).",
)
@click.option("--machine", default=None, help="Substring of the machine column to select.")
def main(csv_path, out, machine) -> None:
    """Draw the PNGs and write the Markdown table of the latest run in bn_speed.csv."""
    with open(csv_path, newline="") as f:
        rows = select_run(list(csv.DictReader(f)), machine)
    out = Path(out or Path(csv_path).parent)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    (out / "bn_speed.md").write_text(text)
    print(text)
    for path in (plot_speedups(rows, out), plot_copies(rows, out), out / "bn_speed.md"):
        print("wrote", path)


if __name__ == "__main__":
    main()
