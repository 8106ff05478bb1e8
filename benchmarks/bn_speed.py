"""Batch-norm speed on the CPU: bnlab vs torch.nn vs torch.compile, against a copy of the same
input.

    python benchmarks/bn_speed.py         # the whole sweep -> benchmarks/results/bn_speed.csv
    python benchmarks/bn_speed.py --shapes conv --modes fwd,full --providers bnlab,torch
    python benchmarks/plot_bn_speed.py    # PNGs and a Markdown table from the CSV

Modes (what one timed call does; the module is built once per case and warmed up first):
  fwd     training-mode forward of an input that requires grad, so the graph is recorded as in
          training
  bwd     backward only: autograd.grad(y, (x, weight, bias), dy, retain_graph=True) on one fixed
          graph
  full    training forward + backward: autograd.grad(module(x), (x, weight, bias), dy)
  eval    eval-mode forward under torch.no_grad()
  bnrelu  BN + ReLU forward + backward (torch.nn: BatchNorm then ReLU; bnlab: the fused
          BatchNormAct)
  addrelu the end of a residual unit, forward + backward with a shortcut r of x's shape
          (torch.nn: ``relu_(bn(x).add_(r))``, as ResNet blocks write it; bnlab: ``bn.add_act(x,
          r)``, what ``convert(model, fuse_activations=True)`` makes of them)

Providers:
  bnlab        bnlab.nn modules, automatic kernel backend (the ``backend`` column says which one
               ran)
  bnlab-torch  bnlab.nn modules with backend="composite": PyTorch ops only (a control)
  torch        torch.nn.BatchNorm1d/2d/3d (+ torch.nn.ReLU)
  compile      torch.compile(dynamic=False) of the torch.nn module, compiled afresh for every case

Limit: every shape and layout also times ``dst.copy_(x)`` (provider and mode ``copy``: a
preallocated destination, the memory-bandwidth limit; timed before and after the layout's cases, the
faster kept) and ``x.clone()`` (mode ``clone``: a copy that allocates its output on each call, as
every provider does; large fresh allocations cost page faults). ``copy_equivalents`` = median / copy
median. ``passes`` is the minimal traffic in tensor sizes (fwd: read x for the statistics, read x,
write y = 3; bwd: read x and dy for the sums, read them again, write dx = 5; full and bnrelu: 8;
addrelu: 12, reading r and writing dr too;
eval, copy and clone: 2); ``gbps`` = passes * bytes of x / median.

Allocator (``--allocator``): glibc serves allocations above 32 MB with fresh mmaps, so every
provider's output of a large shape pays first-touch page faults on every call (on the 2-core
development machine ~7 copies' worth for a 51 MB tensor, more than torch's whole batch norm).
``jemalloc`` (the default where libjemalloc.so.2 is installed, e.g. ``apt install libjemalloc2``)
re-runs the script with jemalloc preloaded and told to keep freed pages: no faults after the
warm-up, for every provider. ``reuse`` re-runs it with glibc's MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ raised; that removes most faults but not all (torch's aligned allocations
leave freed blocks a little too small to reuse, so some calls still take fresh pages, and which
provider's calls do depends on their other small allocations: measured 0-4,600 faults per call
by mode and provider). ``thp`` keeps glibc but sets THP_MEM_ALLOC_ENABLE=1 (PyTorch then asks for
transparent huge pages for large tensors: a fault per 2 MB instead of per 4 KB). ``default`` keeps
glibc's behaviour. The ``allocator`` column records which was used.

Times are torch.utils.benchmark medians with p20/p80 (benchmarks/common.py); the providers of one
mode are timed in turn, in 8 rounds, so that a slow stretch of the machine hits all of them.
``paired_speedup`` (the speed-up the tables give) is the median over the rounds of torch.nn's round
median over the provider's, each pair timed a moment apart. Threads: torch runs
``--threads`` intra-op threads (default: every core, ``os.cpu_count()``); bnlab's CPU kernels follow
torch's setting. Rows are appended after every shape, with a ``run`` stamp shared by the whole run.
A case that cannot run (a module not in this bnlab yet, a failed compilation) is recorded with its
``status`` and skipped.
"""

from __future__ import annotations

import gc
import os
import traceback
from datetime import datetime, timezone

import click
import torch

from common import (
    MEMORY_FORMAT,
    append_rows,
    default_allocator,
    ensure_allocator,
    parse_shape,
    sample_ms,
    shape_name,
    summarize,
    time_ms,
)

SHAPES = {  # group -> shapes
    "conv": [(64, 64, 56, 56), (256, 256, 14, 14), (128, 32, 32, 32), (32, 128, 28, 28)],
    "small-c": [(16, 3, 224, 224), (8, 1, 256, 256)],
    "small": [(128, 32, 16, 16), (128, 64, 8, 8), (32, 64, 8, 8)],  # CIFAR-sized nets
    "mlp": [(4096, 1024), (65536, 64), (256, 4096)],
    "3d": [(8, 32, 16, 32, 32)],
}
LAYOUTS = ("contiguous", "channels_last")  # channels_last means channels_last_3d for 5-D inputs
MODES = ("fwd", "bwd", "full", "eval", "bnrelu", "addrelu")
PROVIDERS = ("bnlab", "bnlab-torch", "torch", "compile")
PASSES = {
    "fwd": 3, "bwd": 5, "full": 8, "bnrelu": 8, "addrelu": 12, "eval": 2, "copy": 2, "clone": 2,
}  # fmt: skip
BN_NAME = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def group_of(shape: tuple[int, ...]) -> str:
    return next((g for g, shapes in SHAPES.items() if shape in shapes), "other")


def make_input(shape, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A standard-normal leaf that requires grad, in ``layout``."""
    x = torch.randn(shape, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=MEMORY_FORMAT[x.dim()])
    return x.requires_grad_()


def torch_module(ndim: int, c: int, act: bool) -> torch.nn.Module:
    bn = getattr(torch.nn, BN_NAME[ndim])(c)
    return torch.nn.Sequential(bn, torch.nn.ReLU()) if act else bn


def bnlab_module(ndim: int, c: int, act: bool, backend: str | None) -> torch.nn.Module:
    """bnlab's BatchNorm, or its fused BatchNormAct (ReLU) for ``act``; imported lazily."""
    import bnlab.nn

    kwargs = {"backend": backend} if backend else {}
    if act:
        cls = getattr(bnlab.nn, BN_NAME[ndim].replace("BatchNorm", "BatchNormAct"))
        return cls(c, activation="relu", **kwargs)
    return getattr(bnlab.nn, BN_NAME[ndim])(c, **kwargs)


def make_module(provider: str, ndim: int, c: int, act: bool, dtype: torch.dtype) -> torch.nn.Module:
    if provider == "torch":
        module = torch_module(ndim, c, act)
    elif provider == "compile":
        # a fresh compilation: no recompile limit hit, no shape generalization
        torch._dynamo.reset()
        module = torch.compile(torch_module(ndim, c, act), dynamic=False)
    else:
        module = bnlab_module(ndim, c, act, "composite" if provider == "bnlab-torch" else None)
    return module.to(dtype)


def workload(module: torch.nn.Module, x: torch.Tensor, mode: str):
    """The callable timed for ``mode``; sets the module's train/eval state."""
    if mode == "eval":
        module.eval()

        def forward_no_grad():
            with torch.no_grad():
                return module(x)

        return forward_no_grad
    module.train()
    if mode == "fwd":
        return lambda: module(x)
    if mode == "addrelu":
        return residual_unit_step(module, x)
    inputs = [x, *module.parameters()]
    y = module(x)
    dy = torch.randn_like(y)
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(module(x), inputs, dy)  # full, bnrelu


def residual_unit_step(module: torch.nn.Module, x: torch.Tensor):
    """Forward + backward of act(bn(x) + r): bnlab's ``add_act``, or torch.nn's three ops."""
    r = torch.randn_like(x).requires_grad_()
    inputs = [x, r, *module.parameters()]
    add_act = getattr(module, "add_act", None)

    def forward():
        return add_act(x, r) if add_act is not None else module(x).add_(r).relu_()

    dy = torch.randn_like(x)
    return lambda: torch.autograd.grad(forward(), inputs, dy)


def backend_used(provider: str, x: torch.Tensor, mode: str) -> str:
    """The bnlab kernel backend module that runs the case's op on ``x`` for ``provider``."""
    if not provider.startswith("bnlab"):
        return ""
    return backends_of_mode(x, mode, "composite" if provider == "bnlab-torch" else None)


def backends_of_mode(x: torch.Tensor, mode: str, requested: str | None) -> str:
    """e.g. "cpu", or "cpu+native" for a full step whose backward runs in another backend."""
    from bnlab.kernels import select_backend, select_residual_backend

    if mode == "addrelu":
        return select_residual_backend(x, True, requested, "relu", False).name
    ops = {
        "bnrelu": ["batch_norm_act"],
        "eval": ["batch_norm_eval"],
        "fwd": ["batch_norm"],
        "bwd": ["batch_norm_backward"],
        "full": ["batch_norm", "batch_norm_backward"],
    }[mode]
    names = dict.fromkeys(select_backend(op, x, requested).name for op in ops)
    return "+".join(names)


def measure(fn, min_run_time: float, threads: int, warmup: int = 2) -> dict[str, float]:
    """Warm up, then time; torch's thread count is re-imposed after the warm-up because starting a
    Numba OpenMP thread pool resets OpenMP's (hence torch's) thread count to Numba's default."""
    for _ in range(warmup):  # JIT compilation, lazy initialization, first-touch allocations
        fn()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return time_ms(fn, min_run_time)


def row(
    case: dict,
    mode: str,
    provider: str,
    stats: dict | None,
    copy_ms: float | None,
    nbytes: int,
    backend: str = "",
    status: str = "ok",
) -> dict:
    """One CSV row; every row has the same columns (empty where a case did not run)."""
    timed = {
        "median_ms": "",
        "p20_ms": "",
        "p80_ms": "",
        "copy_ms": "",
        "copy_equivalents": "",
        "gbps": "",
        "paired_speedup": "",
    }
    if stats:
        median = stats["median_ms"]
        paired = stats.get("paired_speedup")
        timed = {
            **{k: round(stats[k], 5) for k in ("median_ms", "p20_ms", "p80_ms")},
            "copy_ms": round(copy_ms, 5),
            "copy_equivalents": round(median / copy_ms, 3),
            "gbps": round(PASSES[mode] * nbytes / median / 1e6, 2),
            "paired_speedup": "" if paired is None else round(paired, 4),
        }
    return {
        **case,
        "mode": mode,
        "provider": provider,
        "backend": backend,
        "passes": PASSES[mode],
        **timed,
        "status": status,
    }


ROUNDS = 8  # providers of one mode are timed in turn, this many times: drift hits all alike


def prepare(x: torch.Tensor, mode: str, provider: str, threads: int):
    """(callable, backend, status) for one (mode, provider), warmed up; callable None if it
    failed."""
    try:
        module = make_module(provider, x.dim(), x.shape[1], mode == "bnrelu", x.dtype)
        fn = workload(module, x, mode)
        for _ in range(2):  # JIT compilation, lazy initialization, first-touch allocations
            fn()
        if torch.get_num_threads() != threads:  # see measure()
            torch.set_num_threads(threads)
        return fn, backend_used(provider, x, mode), "ok"
    except AttributeError as error:  # a module this bnlab does not have yet
        return None, "", f"unavailable: {error}"
    except Exception as error:  # noqa: BLE001 - record and continue the sweep
        traceback.print_exc(limit=2)
        return None, "", f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def run_mode(x: torch.Tensor, mode: str, providers, min_run_time: float, threads: int):
    """Every provider of one mode, interleaved: ROUNDS rounds of min_run_time / ROUNDS each.
    Returns [(provider, stats or None, backend, status)]; stats include ``paired_speedup``."""
    prepared = {p: prepare(x, mode, p, threads) for p in providers}
    samples = {p: [] for p in providers}
    per_round = {p: [] for p in providers}  # each round's median
    for _ in range(ROUNDS):
        for provider, (fn, _, _) in prepared.items():
            if fn is not None:
                times = sample_ms(fn, min_run_time / ROUNDS)
                samples[provider] += times
                per_round[provider].append(summarize(times)["median_ms"])
    results = []
    for p, (_, backend, status) in prepared.items():
        stats = summarize(samples[p]) if samples[p] else None
        if stats is not None:
            stats["paired_speedup"] = paired_speedup(per_round.get("torch"), per_round[p])
        results.append((p, stats, backend, status))
    return results


def paired_speedup(base_rounds, rounds) -> float | None:
    """Median over rounds of base / provider, each round's medians taken a moment apart: a drift
    of the machine (this one's memory bandwidth halves for minutes at a time) hits both sides of
    each ratio, where the ratio of pooled medians mixes slow and fast stretches unevenly."""
    if not base_rounds or len(base_rounds) != len(rounds):
        return None
    ratios = torch.tensor([b / r for b, r in zip(base_rounds, rounds)], dtype=torch.float64)
    return float(ratios.median())


def run_layout(case: dict, x: torch.Tensor, modes, providers, min_run_time) -> list[dict]:
    """Every mode x provider on ``x``, between two timings of its copy; the faster copy is the limit
    (a copy slowed by a neighbouring process would flatter every copy-equivalent)."""
    threads, nbytes = case["threads"], x.numel() * x.element_size()
    src, dst = x.detach(), torch.empty_like(x.detach())
    copies = [measure(lambda: dst.copy_(src), min_run_time, threads)]
    clone = measure(src.clone, min_run_time, threads)
    timed = []
    for mode in modes:
        for provider, stats, backend, status in run_mode(x, mode, providers, min_run_time, threads):
            timed.append((mode, provider, stats, backend, status))
            print(
                f"{case['shape']:>16s} {case['layout']:13s} {mode:6s} {provider:11s} "
                + (f"{stats['median_ms']:.4f} ms" if stats else status),
                flush=True,
            )
        gc.collect()
    copies.append(measure(lambda: dst.copy_(src), min_run_time, threads))
    copy = min(copies, key=lambda c: c["median_ms"])
    limit = copy["median_ms"]
    return [
        row(case, "copy", "copy", copy, limit, nbytes),
        row(case, "clone", "copy", clone, limit, nbytes),
        *(
            row(case, mode, provider, stats, limit, nbytes, backend, status)
            for mode, provider, stats, backend, status in timed
        ),
    ]


def run_shape(shape, layouts, dtype, modes, providers, min_run_time, threads, run_stamp, allocator):
    """Every layout of one shape (channels_last only for 4-D and 5-D inputs)."""
    rows = []
    for layout in layouts:
        if layout == "channels_last" and len(shape) not in MEMORY_FORMAT:
            continue
        case = {
            "run": run_stamp,
            "shape": shape_name(shape),
            "group": group_of(shape),
            "layout": layout,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": threads,
            "allocator": allocator,
        }
        rows += run_layout(case, make_input(shape, layout, dtype), modes, providers, min_run_time)
    return rows


def format_row(r: dict) -> str:
    head = f"{r['shape']:>16s} {r['layout']:13s} {r['dtype']:7s} {r['mode']:6s} {r['provider']:11s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return (
        f"{head} {r['median_ms']:9.4f} ms (p20 {r['p20_ms']:.4f}, p80 {r['p80_ms']:.4f}) "
        f"{r['copy_equivalents']:5.2f} copies {r['gbps']:6.1f} GB/s {r['backend']}"
    )


def speedup(row: dict | None, base_row: dict | None) -> float | None:
    """A provider's speed-up over torch.nn: the paired per-round ratio where the run has it (see
    paired_speedup), else the ratio of the medians."""
    if row is None or base_row is None:
        return None
    if row.get("paired_speedup"):
        return float(row["paired_speedup"])
    return float(base_row["median_ms"]) / float(row["median_ms"])


def speedup_table(rows: list[dict], provider: str = "bnlab", base: str = "torch") -> str:
    """Markdown: provider's speed-up over base per shape and layout (rows) and mode (columns)."""
    ok = [r for r in rows if r["status"] == "ok"]
    by = {(r["shape"], r["layout"], r["dtype"], r["mode"], r["provider"]): r for r in ok}
    cases = list(dict.fromkeys((r["shape"], r["layout"], r["dtype"]) for r in ok))
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    lines = [
        "| shape | layout | dtype | " + " | ".join(modes) + " |",
        "|---|---|---|" + "---|" * len(modes),
    ]
    for case in cases:
        cells = []
        for mode in modes:
            ratio = speedup(by.get((*case, mode, provider)), by.get((*case, mode, base)))
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        lines.append(f"| {' | '.join(case)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def choose(text: str, allowed, what: str) -> list[str]:
    chosen = split(text)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise click.BadParameter(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return chosen


def expand_shapes(text: str) -> list[tuple[int, ...]]:
    """Group names (conv, small-c, mlp, 3d, all) and/or shapes like 64x64x56x56."""
    shapes = []
    for token in split(text):
        if token == "all":
            shapes += [s for group in SHAPES.values() for s in group]
        elif token in SHAPES:
            shapes += SHAPES[token]
        else:
            shapes.append(parse_shape(token))
    return list(dict.fromkeys(shapes))


@click.command()
@click.option(
    "--shapes",
    default="all",
    show_default=True,
    help="Comma-separated groups (conv, small-c, mlp, 3d, all) and/or shapes NxCx...",
)
@click.option("--layouts", default=",".join(LAYOUTS), show_default=True)
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option("--dtypes", default="float32", show_default=True, help="float32 and/or float64.")
@click.option(
    "--min-run-time",
    default=0.5,
    show_default=True,
    type=float,
    help="Seconds of timed calls per case (torch.utils.benchmark blocked_autorange).",
)
@click.option(
    "--threads",
    default=os.cpu_count(),
    show_default=True,
    type=int,
    help="torch.set_num_threads; bnlab's CPU kernels follow it.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for bn_speed.csv (default benchmarks/results).",
)
@click.option(
    "--allocator",
    default=default_allocator(),
    show_default=True,
    type=click.Choice(["jemalloc", "reuse", "thp", "default"]),
    help="jemalloc: preloaded, keeping freed pages (no page faults per call); reuse: "
    "glibc told to keep freed large blocks (fewer faults); thp: PyTorch's "
    "THP_MEM_ALLOC_ENABLE=1 (huge pages); default: glibc as is.",
)
def main(shapes, layouts, modes, providers, dtypes, min_run_time, threads, out, allocator) -> None:
    """Sweep shapes x layouts x dtypes x modes x providers; append rows to bn_speed.csv."""
    ensure_allocator(allocator)
    layouts = choose(layouts, LAYOUTS, "layouts")
    modes = choose(modes, MODES, "modes")
    providers = choose(providers, PROVIDERS, "providers")
    dtypes = [getattr(torch, d) for d in choose(dtypes, ("float32", "float64"), "dtypes")]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run_stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for dtype in dtypes:
        for shape in expand_shapes(shapes):
            shape_rows = run_shape(
                shape, layouts, dtype, modes, providers, min_run_time, threads, run_stamp, allocator
            )
            path = append_rows("bn_speed.csv", shape_rows, out)
            rows += shape_rows
    print("\n".join(map(format_row, rows)))
    print(
        f"\nappended to {path}\n\n"
        "speedup of bnlab over torch.nn (median over rounds of the paired ratio):\n"
    )
    print(speedup_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} case(s) did not run:")
        for r in failed:
            print(" ", format_row(r))


if __name__ == "__main__":
    main()
