"""Shared benchmark plumbing: timing with percentiles, the machine's name, long-format CSV rows,
the allocator a run uses."""

from __future__ import annotations

import csv
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import click
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).parent / "results"
MEMORY_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}  # "channels_last" by rank

# --allocator: glibc as is; glibc with its mmap / trim thresholds raised (freed memory kept for
# reuse); PyTorch's switch for transparent huge pages; jemalloc preloaded, freed pages kept
ALLOCATORS = ("default", "reuse", "thp", "jemalloc")
REUSE_ALLOCATIONS = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def machine() -> str:
    """e.g. 'x86_64, 2 cores, torch 2.13.0+cpu, 2 threads'."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def jemalloc_library() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def default_allocator() -> str:
    return "jemalloc" if jemalloc_library() else "reuse"


def allocator_environment(allocator: str) -> dict[str, str]:
    """The environment variables that select ``allocator`` (one of ALLOCATORS)."""
    if allocator == "jemalloc":
        library = jemalloc_library()
        if library is None:
            raise click.UsageError(
                "--allocator jemalloc: libjemalloc.so.2 not found (install it, "
                "e.g. apt install libjemalloc2, or use --allocator reuse)"
            )
        return {"LD_PRELOAD": library, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    return {"reuse": REUSE_ALLOCATIONS, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}.get(allocator, {})


def ensure_allocator(allocator: str) -> None:
    """Re-execute the running script under the allocator settings asked for (the allocator is
    chosen when a process starts)."""
    wanted = allocator_environment(allocator)
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})


def sample_ms(fn, min_run_time: float = 1.0) -> list[float]:
    """Per-call wall times of ``fn()`` in milliseconds (torch.utils.benchmark blocks), with torch's
    current thread count (Timer's own default would run everything on one thread)."""
    measurement = Timer(
        "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    ).blocked_autorange(min_run_time=min_run_time)
    return [t * 1e3 for t in measurement.times]


def summarize(times_ms: list[float]) -> dict[str, float]:
    """Median, p20 and p80 (all three interpolated quantiles)."""
    times = torch.tensor(times_ms, dtype=torch.float64)
    return {
        "median_ms": float(times.quantile(0.5)),
        "p20_ms": float(times.quantile(0.2)),
        "p80_ms": float(times.quantile(0.8)),
    }


def time_ms(fn, min_run_time: float = 1.0) -> dict[str, float]:
    """Median, p20 and p80 of ``fn()``'s wall time in milliseconds."""
    return summarize(sample_ms(fn, min_run_time))


def shape_name(shape: tuple[int, ...]) -> str:
    """(64, 64, 56, 56) -> '64x64x56x56', the form shapes take in the CSVs and on the command
    line."""
    return "x".join(map(str, shape))


def parse_shape(text: str) -> tuple[int, ...]:
    """'64x64x56x56' -> (64, 64, 56, 56)."""
    return tuple(int(d) for d in text.lower().split("x"))


def append_rows(csv_name: str, rows: list[dict], directory: Path | None = None) -> Path:
    """Append ``rows`` (with a timestamp and the machine) to ``directory/csv_name``.

    ``directory`` defaults to ``benchmarks/results``; smoke runs point it elsewhere. Rows with a
    column the file lacks rewrite it with that column added (empty in the older rows).
    """
    path = Path(directory or RESULTS) / csv_name
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [{"timestamp": stamp, "machine": machine(), **row} for row in rows]
    columns, kept, rewrite = list(rows[0]), [], not path.exists()
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if set(columns) - set(header):
                kept, rewrite = list(reader), True
            columns = header + [c for c in columns if c not in header]
    with path.open("w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if rewrite:
            writer.writeheader()
        writer.writerows(kept + rows)
    return path


def peak_bytes(fn) -> int:
    """Peak of live CPU allocations while ``fn()`` runs, above the level when it starts.

    The profiler's allocation events (size > 0 allocated, < 0 freed, in every op or outside any) are
    summed in time order; the event tree is the one torch.profiler's own memory timeline reads.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, len(events), node.extra_fields.alloc_size))
        nodes.extend(node.children)
    live = peak = 0
    for _, _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
