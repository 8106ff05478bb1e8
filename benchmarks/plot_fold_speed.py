"""Draw benchmarks/results/fold_speed.png from the latest run in fold_speed.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROVIDERS = ["bnlab-bn", "torch-bn", "frozen", "folded"]


def latest_run(rows: list[dict]) -> list[dict]:
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def main() -> None:
    with (RESULTS / "fold_speed.csv").open() as f:
        rows = latest_run(list(csv.DictReader(f)))
    cases = list(dict.fromkeys((r["model"], r["input"]) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(PROVIDERS)
    for i, provider in enumerate(PROVIDERS):
        ratios, lo, hi = [], [], []
        for model, shape in cases:
            by = {r["provider"]: r for r in rows if (r["model"], r["input"]) == (model, shape)}
            base = float(by["torch-bn"]["median_ms"])
            row = by[provider]
            ratios.append(base / float(row["median_ms"]))
            lo.append(ratios[-1] - base / float(row["p80_ms"]))
            hi.append(base / float(row["p20_ms"]) - ratios[-1])
        xs = [j + (i - (len(PROVIDERS) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, ratios, width, yerr=[lo, hi], label=provider, capsize=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(cases)), [f"{m}\n{s}" for m, s in cases], fontsize=8)
    ax.set_ylabel("speed vs torch.nn BN eval (higher is faster)")
    ax.set_title(f"Inference speed, CPU ({rows[0]['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "fold_speed.png"
    fig.savefig(out, dpi=120)
    print("wrote", out)


if __name__ == "__main__":
    main()
