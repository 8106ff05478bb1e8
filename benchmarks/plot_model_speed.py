"""Draw model_speed.png from model_speed.csv: whole-model speed and memory against torch.nn.

    python benchmarks/plot_model_speed.py [--csv results/model_speed.csv] [--out results]

The sweep is often run in parts (64 px models, 224 px models): for every case (model, input,
layout, dtype, allocator, mode, provider) the latest row is drawn; rows from before the allocator
column ran glibc as is (``default``), and a case under another allocator is labelled with it.
Top: the paired speed over torch.nn of each provider per case, training steps and eval forwards
(1.0: as fast; the 0.98 line is the "never slower" bar; the light grey bar, torch-copy, is the
control: an unchanged copy of the torch.nn model, whose distance from 1.0 is the run's noise).
Bottom: peak memory of one training step relative to torch.nn's, from the latest rows that
measured it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROVIDERS = ("torch-copy", "bnlab", "bnlab-fused", "bnlab-inplace", "no-bn")
COLORS = {
    "torch-copy": "0.8",
    "bnlab": "tab:blue",
    "bnlab-fused": "tab:orange",
    "bnlab-inplace": "tab:green",
}
MIN_PEAK_MB = 50.0  # below this a peak is mostly allocator noise: not drawn
CASE = ("model", "input", "layout", "dtype", "allocator")
N = len(CASE)  # a row's key: (*case, mode, provider)


def latest_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The newest row of every (model, input, layout, dtype, allocator, mode, provider)."""
    latest: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: r["timestamp"]):
        row = {**row, "allocator": row.get("allocator") or "default"}
        latest[tuple(row[k] for k in (*CASE, "mode", "provider"))] = row
    return latest


def case_label(case: tuple) -> str:
    model, shape, layout, dtype, allocator = case
    layout = "NCHW" if layout == "contiguous" else "NHWC"
    allocator = "" if allocator == "default" else f" {allocator}"
    return f"{model} {shape.split('x', 2)[-1]}\n{layout} {dtype}{allocator}"


def speed_panel(ax, latest: dict, mode: str) -> None:
    cases = list(dict.fromkeys(k[:N] for k in latest if k[N] == mode and k[N + 1] != "torch"))
    providers = [p for p in PROVIDERS if any(k[N:] == (mode, p) for k in latest)]
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for j, case in enumerate(cases):
            row = latest.get((*case, mode, provider))
            if row is not None:
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                ys.append(float(row["paired_speedup"]))
        ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider, "0.6"))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.98, color="red", lw=0.8, ls="--", label="0.98 (never slower)")
    ax.set_xticks(range(len(cases)), [case_label(c) for c in cases], fontsize=6, rotation=90)
    ax.set_ylabel(f"{mode}: speed vs torch.nn (paired)")
    ax.set_ylim(0.6, max(1.3, ax.get_ylim()[1]))
    ax.legend(fontsize=6, ncol=3)


def memory_panel(ax, latest: dict) -> None:
    keys = [k for k in latest if k[N] == "train" and latest[k]["peak_mb"]]
    keys = [
        k for k in keys if float(latest[(*k[:N], "train", "torch")]["peak_mb"] or 0) >= MIN_PEAK_MB
    ]
    cases = list(dict.fromkeys(k[:N] for k in keys if k[N + 1] != "torch"))
    cases = [c for c in cases if (*c, "train", "torch") in latest]
    providers = [p for p in PROVIDERS if any(k[N + 1] == p for k in keys)]
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for j, case in enumerate(cases):
            row, base = latest.get((*case, "train", provider)), latest[(*case, "train", "torch")]
            if row is not None and row["peak_mb"] and base["peak_mb"]:
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                ys.append(float(row["peak_mb"]) / float(base["peak_mb"]))
        ax.bar(xs, ys, width, label=provider, color=COLORS.get(provider, "0.6"))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(cases)), [case_label(c) for c in cases], fontsize=6, rotation=90)
    ax.set_ylabel(f"training-step peak / torch.nn's\n(torch.nn peak >= {MIN_PEAK_MB:g} MB)")
    ax.legend(fontsize=6)


@click.command()
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=RESULTS / "model_speed.csv",
    show_default=True,
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=RESULTS, show_default=True
)
def main(csv_path: Path, out: Path) -> None:  # fmt: skip
    """Draw OUT/model_speed.png from the model-speed CSV."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    latest = latest_rows(rows)
    measured = latest_rows([row for row in rows if row["peak_mb"]])  # runs with --no-memory skip it
    machine = next(iter(latest.values()))["machine"]
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.45 * len(latest) / 5 + 4), 13))
    speed_panel(axes[0], latest, "train")
    speed_panel(axes[1], latest, "eval")
    memory_panel(axes[2], measured)
    fig.suptitle(f"Whole models, CPU ({machine})", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "model_speed.png", dpi=110)
    print("wrote", out / "model_speed.png")


if __name__ == "__main__":
    main()
