"""The fixed cost of one bnlab call, beside torch.nn.functional's, on inputs small enough that the
kernel is nothing: what argument checks, backend selection and the running-statistics update
cost a small layer.

    python benchmarks/dispatch_overhead.py   # appends to benchmarks/results/dispatch_overhead.csv

Providers, side by side in one process on the same tensors (one thread): ``bnlab`` (functional
batch_norm / batch_norm_act, automatic backend) and ``torch`` (torch.nn.functional.batch_norm,
then relu for the act case). Modes: ``train`` (forward, running statistics updated), ``eval``,
``act`` (training forward with a fused relu).

Caches (``--caches``, column ``caches``): ``warm`` times calls back to back, as a loop over one
layer sees them; ``cold`` writes over a buffer larger than the last-level cache (``--sweep-mb``)
before each call and times the call alone, as a layer inside a model sees it, right after a
convolution has swept the caches: every Python frame and torch call then fetches its code and
data from memory, so a call's fixed cost grows with the number of calls it makes, not their work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as TF

import bnlab.functional as F
from common import append_rows, parse_shape, shape_name, summarize, time_ms

MODES = ("train", "eval", "act")
CACHES = ("warm", "cold")


def cold_ms(fn, sweep: torch.Tensor, calls: int) -> dict[str, float]:
    """Median, p20 and p80 of ``fn()``'s wall time, each call timed alone after a write over
    ``sweep``."""
    times = []
    for _ in range(calls):
        sweep.add_(1.0)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


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


def timed(fn, caches: str, args, sweep: torch.Tensor) -> dict[str, float]:
    if caches == "warm":
        return time_ms(fn, args.min_run_time)
    if caches == "cold":
        return cold_ms(fn, sweep, args.cold_calls)
    raise SystemExit(f"--caches takes warm and/or cold, got {caches!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x3,8x64x8x8", help="comma-separated, e.g. 4x3")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--caches", default=",".join(CACHES), help="warm, cold or both")
    parser.add_argument("--sweep-mb", type=int, default=64, help="cold: the buffer written over")
    parser.add_argument("--cold-calls", type=int, default=200, help="cold: calls timed")
    parser.add_argument("--out", type=Path, default=None, help="CSV directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = torch.zeros(args.sweep_mb * 2**18)  # float32: 4 bytes a value
    rows = []
    cases = [
        (shape, mode, caches)
        for shape in map(parse_shape, args.shapes.split(","))
        for mode in MODES
        for caches in args.caches.split(",")
    ]
    for shape, mode, caches in cases:
        x = torch.randn(*shape)
        times = {p: timed(call(p, mode, x), caches, args, sweep) for p in ("bnlab", "torch")}
        for provider, t in times.items():
            ratio = t["median_ms"] / times["torch"]["median_ms"]
            rows.append(
                dict(
                    shape=shape_name(shape),
                    mode=mode,
                    caches=caches,
                    provider=provider,
                    median_us=round(t["median_ms"] * 1e3, 2),
                    p20_us=round(t["p20_ms"] * 1e3, 2),
                    p80_us=round(t["p80_ms"] * 1e3, 2),
                    over_torch=round(ratio, 3),
                )
            )
            print(
                f"{shape_name(shape):12} {mode:5} {caches:4} {provider:6} "
                f"median {t['median_ms'] * 1e3:8.2f} us  x{ratio:.2f} torch"
            )
    print("appended to", append_rows("dispatch_overhead.csv", rows, args.out))


if __name__ == "__main__":
    main()
