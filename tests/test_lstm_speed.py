"""Smoke run of the LSTM speed benchmark (one small case, one round) and its plot/table."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_lstm_speed_smoke_run_writes_rows_a_plot_and_a_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["lstm_speed.py", "--cases", "row-mnist", "--rounds", "1", "--min-run-time", "0.01"],
        ["plot_lstm_speed.py", "--csv", str(tmp_path / "lstm_speed.csv")],
    ):
        result = subprocess.run(
            [sys.executable, str(BENCHMARKS / args[0]), *args[1:], "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    with (tmp_path / "lstm_speed.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (m, p) for m in ("forward", "full") for p in ("torch-lstm", "loop-lstm", "bnlstm")
    ]
    for r in rows:
        assert (r["T"], r["N"], r["I"], r["H"]) == ("28", "100", "28", "100")
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
    assert "| row-mnist (28 x 100 x 28 -> 100) | full |" in (tmp_path / "lstm_speed.md").read_text()
    assert (tmp_path / "lstm_speed.png").stat().st_size > 1000


def test_loop_lstm_is_torch_lstm():
    """The benchmark's plain loop LSTM computes torch.nn.LSTM's function (same weights)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from lstm_speed import LoopLSTM
    finally:
        sys.path.remove(str(BENCHMARKS))
    torch.manual_seed(0)
    ref, loop = torch.nn.LSTM(3, 5), LoopLSTM(3, 5)
    with torch.no_grad():
        loop.weight_ih.copy_(ref.weight_ih_l0)
        loop.weight_hh.copy_(ref.weight_hh_l0)
        loop.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
    x = torch.randn(7, 4, 3)
    (a, (ha, ca)), (b, (hb, cb)) = ref(x), loop(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ha[0], hb)
    torch.testing.assert_close(ca[0], cb)
