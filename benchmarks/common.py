"""Shared benchmark plumbing: timing with percentiles, the machine's name, long-format CSV rows."""

from __future__ import annotations

import csv
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """e.g. 'x86_64, 2 cores, torch 2.13.0+cpu, 2 threads'."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


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

    ``directory`` defaults to ``benchmarks/results``; smoke runs point it elsewhere.
    """
    path = Path(directory or RESULTS) / csv_name
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [{"timestamp": stamp, "machine": machine(), **row} for row in rows]
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
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
