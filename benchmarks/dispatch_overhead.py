"""The fixed cost of one bnlab call, beside torch.nn.functional's, on inputs small enough that the
kernel is nothing: what argument checks, backend selection and the running-statistics update
cost a small layer.

    python benchmarks/dispatch_overhead.py   # appends to benchmarks/results/dispatch_overhead.csv

Providers, side by side in one process on the same tensors (one thread): ``bnlab`` (functional
batch_norm / batch_norm_act, automatic backend) and ``torch`` (torch.nn.functional.batch_norm,
then relu for the act case). Modes: ``train`` (forward, running statistics updated), ``eval``,
``act`` (training forward with a fused relu).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as TF

import bnlab.functional as F
from common import append_rows, parse_shape, shape_name, time_ms

MODES = ("train", "eval", "act")


def call(provider: str, mode: str, x: torch.Tensor):
    c = x.shape[1]
    mean, var, nbt = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)
    weight, bias, training = torch.ones(c), torch.zeros(c), mode != "eval"
    if provider == "torch":
        if mode == "act":
            return lambda: torch.relu(TF.batch_norm(x, mean, var, weight, bias, True))
        return lambda: TF.batch_norm(x, mean, var, weight, bias, training)
    kwargs = dict(num_batches_tracked=nbt)
    if mode == "act":
        return lambda: F.batch_norm_act(x, mean, var, weight, bias, True, **kwargs)
    return lambda: F.batch_norm(x, mean, var, weight, bias, training, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x3,8x64x8x8", help="comma-separated, e.g. 4x3")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="CSV directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for shape in map(parse_shape, args.shapes.split(",")):
        x = torch.randn(*shape)
        for mode in MODES:
            times = {p: time_ms(call(p, mode, x), args.min_run_time) for p in ("bnlab", "torch")}
            for provider, t in times.items():
                ratio = t["median_ms"] / times["torch"]["median_ms"]
                rows.append(
                    dict(
                        shape=shape_name(shape),
                        mode=mode,
                        provider=provider,
                        median_us=round(t["median_ms"] * 1e3, 2),
                        p20_us=round(t["p20_ms"] * 1e3, 2),
                        p80_us=round(t["p80_ms"] * 1e3, 2),
                        over_torch=round(ratio, 3),
                    )
                )
                print(
                    f"{shape_name(shape):12} {mode:5} {provider:6} "
                    f"median {t['median_ms'] * 1e3:8.2f} us  x{ratio:.2f} torch"
                )
    print("appended to", append_rows("dispatch_overhead.csv", rows, args.out))


if __name__ == "__main__":
    main()
