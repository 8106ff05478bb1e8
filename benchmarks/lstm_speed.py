"""A BN-LSTM training step against torch.nn.LSTM and a plain LSTM written like it, on the CPU.

    # appends to benchmarks/results/lstm_speed.csv
    OMP_NUM_THREADS=1 python benchmarks/lstm_speed.py
    # draws lstm_speed.png and lstm_speed.md
    python benchmarks/plot_lstm_speed.py
    # smoke
    python benchmarks/lstm_speed.py --cases row-mnist --rounds 2 --min-run-time 0.05 --out /tmp/x

Providers, each run side by side in one process on the same inputs (one layer, training mode):
  torch-lstm   torch.nn.LSTM (ATen's fused CPU LSTM)
  loop-lstm    a plain LSTM in Python written the way bnlab.nn.BNLSTM is (input projection for all
               steps in one matmul, then one mm + one sigmoid + tanh per step), without BN
  bnlstm       bnlab.nn.BNLSTM (per-step batch statistics of the input, recurrent and cell terms)

Modes: "forward" (training-mode forward) and "full" (forward + backward of the summed last output;
the step an optimizer would take, without the update). Every provider allocates the same way
(fresh activations every call). Timing: see :func:`main`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bnlab.nn import BNLSTM
from common import append_rows, time_ms

CASES = {  # name: (T, N, I, H)
    "pixel-mnist": (
        784,
        100,
        1,
        100,
    ),  # the acceptance shape: at most 3x torch-lstm per training step
    "row-mnist": (28, 100, 28, 100),
    "seq-100": (100, 64, 32, 128),
}


class LoopLSTM(nn.Module):
    """torch.nn.LSTM's equations, written the way bnlab.nn.BNLSTM is, without the BNs."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        ref = nn.LSTM(input_size, hidden_size)
        self.weight_ih, self.weight_hh = ref.weight_ih_l0, ref.weight_hh_l0
        self.bias = nn.Parameter((ref.bias_ih_l0 + ref.bias_hh_l0).detach())

    def forward(self, x: torch.Tensor):
        T, N, _ = x.shape
        H = self.weight_hh.shape[1]
        wx = torch.addmm(self.bias, x.reshape(T * N, -1), self.weight_ih.t()).view(T, N, 4 * H)
        h = c = x.new_zeros(N, H)
        w_t, outs = self.weight_hh.t(), []
        for wx_t in wx.unbind(0):
            gates = torch.addmm(wx_t, h, w_t)
            i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
            c = torch.addcmul(f * c, i, torch.tanh(gates[:, 2 * H : 3 * H]))
            h = o * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs), (h, c)


def providers(I: int, H: int, T: int) -> dict[str, nn.Module]:
    return {
        "torch-lstm": nn.LSTM(I, H),
        "loop-lstm": LoopLSTM(I, H),
        "bnlstm": BNLSTM(I, H, max_length=T),
    }


def step(model: nn.Module, x: torch.Tensor, backward: bool):
    def fn():
        out, _ = model(x)
        if backward:
            out[-1].sum().backward()

    return fn


def main(argv=None) -> None:
    """Providers interleaved in ``--rounds`` rounds (a load change on the shared machine hits all of
    them alike); per provider the median, p20 and p80 of its per-round medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES)
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="seconds per provider per round"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="CSV directory (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in args.cases.split(","):
        T, N, I, H = CASES[name]
        x = torch.randn(T, N, I)
        for mode in ("forward", "full"):
            fns = {}
            for provider, model in providers(I, H, T).items():
                fn = step(model.train(), x, mode == "full")
                fns[provider] = torch.no_grad()(fn) if mode == "forward" else fn
                fns[provider]()  # warm up
            per_round: dict[str, list[float]] = {p: [] for p in fns}
            for _ in range(args.rounds):
                for provider, fn in fns.items():
                    per_round[provider].append(time_ms(fn, args.min_run_time)["median_ms"])
            base = None
            for provider, values in per_round.items():
                v = torch.tensor(values)
                stats = {
                    "median_ms": float(v.quantile(0.5)),
                    "p20_ms": float(v.quantile(0.2)),
                    "p80_ms": float(v.quantile(0.8)),
                }
                base = stats["median_ms"] if base is None else base
                rows.append(
                    {
                        "case": name,
                        "T": T,
                        "N": N,
                        "I": I,
                        "H": H,
                        "mode": mode,
                        "provider": provider,
                        "vs_torch_lstm": round(stats["median_ms"] / base, 3),
                        **{k: round(val, 3) for k, val in stats.items()},
                    }
                )
                print(
                    f"{name:12s} T={T:<4d} N={N:<4d} I={I:<3d} H={H:<4d} {mode:8s} {provider:11s} "
                    f"median {stats['median_ms']:9.2f} ms  (p20 {stats['p20_ms']:.2f}, "
                    f"p80 {stats['p80_ms']:.2f})  x{stats['median_ms'] / base:.2f} torch-lstm",
                    flush=True,
                )
    print("appended to", append_rows("lstm_speed.csv", rows, args.out))


if __name__ == "__main__":
    main()
