"""Batch-norm speed on a CUDA GPU: bnlab's Triton kernels vs torch.nn (cuDNN and PyTorch's own
kernels) vs torch.compile, against the device's copy bandwidth measured in the same run.

    python benchmarks/bn_speed_gpu.py   # the sweep -> benchmarks/results/bn_speed_gpu.csv
    python benchmarks/bn_speed_gpu.py --shapes 256x64x112x112 --dtypes bfloat16 --modes fwd
    python benchmarks/bn_speed_gpu.py --device cpu --shapes 4x8x8x8 --providers bnlab,torch  # smoke

Modes are those of ``bn_speed.py`` (fwd, bwd, full, eval, bnrelu), and so is ``passes``, the
minimal traffic in tensor sizes (fwd 3: read x for the statistics, read x, write y; bwd 5; full and
bnrelu 8; eval and copy 2).

Providers:
  bnlab         bnlab.nn modules, automatic backend (Triton on CUDA; the ``backend`` column says)
  torch         torch.nn modules as users run them (cuDNN where PyTorch picks it)
  torch-native  torch.nn modules with cuDNN disabled: PyTorch's own CUDA batch-norm kernels
  compile       torch.compile(dynamic=False) of the torch.nn module

Limit: ``dst.copy_(x)`` into a preallocated tensor (provider and mode ``copy``). ``copy_fraction`` =
(passes * bytes of x / median) / (2 * bytes of x / copy median): the share of the measured copy
bandwidth a case reaches by its minimal traffic.

Timing: ``triton.testing.do_bench`` on CUDA (CUDA events; the L2 cache is flushed before every
call, so nothing is served from cache), median with p20/p80; on the CPU (a smoke run, Triton's
interpreter) the wall-clock timer of ``bn_speed.py``.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone

import click

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402

from bn_speed import (
    PASSES,
    backends_of_mode,
    bnlab_module,  # noqa: E402
    choose,
    make_module,
    workload,
)
from common import MEMORY_FORMAT, append_rows, parse_shape, shape_name, time_ms  # noqa: E402

SHAPES = [
    (256, 64, 112, 112),
    (256, 256, 56, 56),
    (256, 512, 28, 28),
    (256, 1024, 14, 14),
    (256, 2048, 7, 7),
    (32, 3, 512, 512),
    (65536, 1024),
]
MODES = ("fwd", "bwd", "full", "eval", "bnrelu")
PROVIDERS = ("bnlab", "torch", "torch-native", "compile")


def make_input(shape, layout: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=MEMORY_FORMAT[x.dim()])
    return x.requires_grad_()


def timer(device: str, min_run_time: float):
    """median/p20/p80 in ms of a callable, by CUDA events (L2 flushed) or by the wall clock."""
    if device != "cuda":
        return lambda fn: time_ms(fn, min_run_time)
    from triton.testing import do_bench

    def cuda_time(fn):
        median, p20, p80 = do_bench(
            fn, warmup=25, rep=max(1, int(min_run_time * 1e3)), quantiles=[0.5, 0.2, 0.8]
        )
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}

    return cuda_time


def bnlab_backend(x: torch.Tensor) -> str | None:
    """Automatic on a GPU; on the CPU (smoke run) the Triton kernels by name, in the interpreter."""
    return None if x.is_cuda else "gpu"


def provider_call(provider: str, x: torch.Tensor, mode: str):
    """The timed callable; torch-native runs with cuDNN switched off around every call."""
    act = mode == "bnrelu"
    if provider == "bnlab":
        module = bnlab_module(x.dim(), x.shape[1], act, bnlab_backend(x)).to(x.dtype)
    else:
        module = make_module(
            "torch" if provider == "torch-native" else provider, x.dim(), x.shape[1], act, x.dtype
        )
    fn = workload(module.to(x.device), x, mode)
    if provider != "torch-native":
        return fn

    def without_cudnn():
        with torch.backends.cudnn.flags(enabled=False):
            return fn()

    return without_cudnn


def run_case(case: dict, x: torch.Tensor, modes, providers, measure) -> list[dict]:
    nbytes = x.numel() * x.element_size()
    src, dst = x.detach(), torch.empty_like(x.detach())
    copy_ms = measure(lambda: dst.copy_(src))["median_ms"]
    rows = [
        dict(
            case,
            mode="copy",
            provider="copy",
            backend="",
            passes=2,
            median_ms=copy_ms,
            p20_ms="",
            p80_ms="",
            copy_ms=copy_ms,
            copy_fraction=1.0,
            gbps=2 * nbytes / copy_ms / 1e6,
            status="ok",
        )
    ]
    for mode in modes:
        for provider in providers:
            row = dict(
                case,
                mode=mode,
                provider=provider,
                backend="",
                passes=PASSES[mode],
                median_ms="",
                p20_ms="",
                p80_ms="",
                copy_ms=copy_ms,
                copy_fraction="",
                gbps="",
                status="ok",
            )
            try:
                fn = provider_call(provider, x, mode)
                fn(), fn()  # compilation, autotuning, lazy initialization
                stats = measure(fn)
            except Exception as error:  # noqa: BLE001 - record and go on with the sweep
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            else:
                median = stats["median_ms"]
                row.update(
                    stats,
                    backend=backends_of_mode(x, mode, bnlab_backend(x))
                    if provider == "bnlab"
                    else "",
                    copy_fraction=PASSES[mode] * copy_ms / (2 * median),
                    gbps=PASSES[mode] * nbytes / median / 1e6,
                )
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    head = f"{r['shape']:>16s} {r['layout']:13s} {r['dtype']:8s} {r['mode']:6s} {r['provider']:12s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return (
        f"{head} {r['median_ms']:9.4f} ms {r['gbps']:8.1f} GB/s "
        f"{r['copy_fraction']:6.1%} of copy {r['backend']}"
    )


def speedup_table(rows: list[dict]) -> str:
    """bnlab's median, torch's (best of cuDNN and native), their ratio and bnlab's copy fraction."""
    lines = [
        "| shape | layout | dtype | mode | bnlab ms | torch ms | bnlab speed-up "
        "| bnlab % of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = [r for r in rows if r["status"] == "ok"]
    keys = dict.fromkeys(
        (r["shape"], r["layout"], r["dtype"], r["mode"]) for r in ok if r["provider"] == "bnlab"
    )
    for key in keys:
        same = [r for r in ok if (r["shape"], r["layout"], r["dtype"], r["mode"]) == key]
        ours = next(r for r in same if r["provider"] == "bnlab")
        theirs = [r["median_ms"] for r in same if r["provider"] in ("torch", "torch-native")]
        if not theirs:
            continue
        best = min(theirs)
        lines.append(
            f"| {' | '.join(key)} | {ours['median_ms']:.4f} | {best:.4f} | "
            f"{best / ours['median_ms']:.2f}x | {ours['copy_fraction']:.0%} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--shapes", default=",".join(map(shape_name, SHAPES)), show_default=True)
@click.option("--layouts", default="contiguous,channels_last", show_default=True)
@click.option("--dtypes", default="float32,bfloat16", show_default=True)
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cuda", "cpu"]),
    default="cuda",
    show_default=True,
    help="cpu: a smoke run of the Triton kernels in Triton's interpreter",
)
@click.option(
    "--min-run-time",
    type=float,
    default=0.1,
    show_default=True,
    help="seconds of timed calls per case",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="directory of the CSV (default benchmarks/results)",
)
def main(shapes, layouts, dtypes, modes, providers, device, min_run_time, out) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("no CUDA device: use --device cpu for a smoke run")
    layouts = choose(layouts, ("contiguous", "channels_last"), "layouts")
    dtypes = [
        getattr(torch, d) for d in choose(dtypes, ("float32", "bfloat16", "float16"), "dtypes")
    ]
    modes, providers = choose(modes, MODES, "modes"), choose(providers, PROVIDERS, "providers")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    measure, rows = timer(device, min_run_time), []
    for shape in map(parse_shape, shapes.split(",")):
        for layout in layouts:
            if layout == "channels_last" and len(shape) not in MEMORY_FORMAT:
                continue
            for dtype in dtypes:
                case = {
                    "run": stamp,
                    "device": name,
                    "shape": shape_name(shape),
                    "layout": layout,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                try:
                    case_rows = run_case(
                        case, make_input(shape, layout, dtype, device), modes, providers, measure
                    )
                except torch.cuda.OutOfMemoryError:
                    print(
                        f"{case['shape']} {layout} {case['dtype']}: out of device memory, skipped"
                    )
                    continue
                append_rows("bn_speed_gpu.csv", case_rows, out)
                rows += case_rows
                if device == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{name}, torch {torch.__version__}\n")
    print(speedup_table(rows))


if __name__ == "__main__":
    main()
