"""Draw lstm_speed.png and the Markdown table lstm_speed.md from the latest run in lstm_speed.csv.

python benchmarks/plot_lstm_speed.py [--csv benchmarks/results/lstm_speed.csv] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROVIDERS = ["torch-lstm", "loop-lstm", "bnlstm"]
TARGET = 3.0  # issue 6: a BN-LSTM training step at most 3x torch.nn.LSTM's


def latest_run(rows: list[dict]) -> list[dict]:
    last = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == last]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case (T x N x I -> H) | mode | torch.nn.LSTM ms | loop LSTM ms | BN-LSTM ms "
        "| BN-LSTM / torch |",
        "|---|---|---|---|---|---|",
    ]
    cases = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    for case, mode in cases:
        by = {r["provider"]: r for r in rows if (r["case"], r["mode"]) == (case, mode)}
        r0 = by["torch-lstm"]
        shape = f"{r0['T']} x {r0['N']} x {r0['I']} -> {r0['H']}"
        ms = [f"{float(by[p]['median_ms']):.1f}" for p in PROVIDERS]
        lines.append(
            f"| {case} ({shape}) | {mode} | {' | '.join(ms)} | "
            f"{float(by['bnlstm']['vs_torch_lstm']):.2f}x |"
        )
    return "\n".join(lines) + f"\n\nMachine: {rows[0]['machine']}; run {rows[0]['timestamp']}.\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=RESULTS / "lstm_speed.csv")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with args.csv.open() as f:
        rows = latest_run(list(csv.DictReader(f)))
    cases = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(PROVIDERS)
    for i, provider in enumerate(PROVIDERS):
        ratios, lo, hi = [], [], []
        for case, mode in cases:
            by = {r["provider"]: r for r in rows if (r["case"], r["mode"]) == (case, mode)}
            base = float(by["torch-lstm"]["median_ms"])
            row = by[provider]
            ratios.append(float(row["median_ms"]) / base)
            lo.append(ratios[-1] - float(row["p20_ms"]) / base)
            hi.append(float(row["p80_ms"]) / base - ratios[-1])
        xs = [j + (i - (len(PROVIDERS) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, ratios, width, yerr=[lo, hi], label=provider, capsize=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(
        TARGET, color="red", lw=0.8, ls="--", label=f"target for a training step ({TARGET:g}x)"
    )
    ax.set_xticks(range(len(cases)), [f"{c}\n{m}" for c, m in cases], fontsize=8)
    ax.set_ylabel("time / torch.nn.LSTM's (lower is faster)")
    ax.set_title(f"One LSTM layer, training mode, CPU ({rows[0]['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "lstm_speed.png", dpi=120)
    (args.out / "lstm_speed.md").write_text(markdown(rows))
    print("wrote", args.out / "lstm_speed.png", "and", args.out / "lstm_speed.md")


if __name__ == "__main__":
    main()
