"""Smoke runs of the CPU benchmarks: one tiny case each, written to a temporary directory.

Benchmarks are not timed tests: only the CSV's structure and the sanity of its numbers are checked.
"""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SPEED_COLUMNS = {
    "timestamp",
    "machine",
    "run",
    "shape",
    "group",
    "layout",
    "dtype",
    "threads",
    "allocator",
    "mode",
    "provider",
    "backend",
    "passes",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "copy_ms",
    "copy_equivalents",
    "gbps",
    "paired_speedup",
    "status",
}
MEMORY_COLUMNS = {
    "timestamp",
    "machine",
    "shape",
    "depth",
    "provider",
    "threads",
    "tensor_bytes",
    "saved_bytes",
    "peak_bytes",
    "saved_tensors",
    "peak_tensors",
    "saved_vs_torch",
    "peak_vs_torch",
    "status",
}


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_bn_speed_smoke_run_writes_rows_and_a_table(tmp_path):
    out = run_script(
        "bn_speed.py",
        "--shapes",
        "4x8x8x8",
        "--layouts",
        "contiguous",
        "--modes",
        "full,addrelu",
        "--providers",
        "bnlab,torch",
        "--min-run-time",
        "0.01",
        "--threads",
        "1",
        "--allocator",
        "reuse",
        "--out",
        str(tmp_path),
    )
    rows = read_rows(tmp_path / "bn_speed.csv")
    assert set(rows[0]) == SPEED_COLUMNS
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("copy", "copy"),
        ("clone", "copy"),
        ("full", "bnlab"),
        ("full", "torch"),
        ("addrelu", "bnlab"),
        ("addrelu", "torch"),
    ]
    assert {r["backend"] for r in rows if r["mode"] == "addrelu"} == {"native", ""}
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["copy_equivalents"]) > 0 and float(r["gbps"]) > 0
        assert (r["shape"], r["threads"], r["dtype"]) == ("4x8x8x8", "1", "float32")
        assert r["allocator"] == "reuse"  # the script re-ran itself with glibc's reuse settings
    paired = {r["provider"]: r["paired_speedup"] for r in rows if r["mode"] == "full"}
    assert float(paired["torch"]) == 1.0 and float(paired["bnlab"]) > 0  # per-round ratios
    assert "| 4x8x8x8 | contiguous | float32 |" in out

    run_script("plot_bn_speed.py", "--csv", str(tmp_path / "bn_speed.csv"), "--out", str(tmp_path))
    assert "bnlab over torch.nn" in (tmp_path / "bn_speed.md").read_text()
    assert (tmp_path / "bn_speed_speedup.png").stat().st_size > 0
    assert (tmp_path / "bn_speed_copies.png").stat().st_size > 0


def test_abn_memory_smoke_run_counts_saved_tensors(tmp_path):
    run_script(
        "abn_memory.py",
        "--shapes",
        "2x4x16x16",
        "--depths",
        "1",
        "--providers",
        "torch,torch-inplace,bnlab-bn",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    )
    rows = {r["provider"]: r for r in read_rows(tmp_path / "abn_memory.csv")}
    assert set(rows["torch"]) == MEMORY_COLUMNS
    for r in rows.values():
        assert r["status"] == "ok", r
        assert int(r["peak_bytes"]) > 0 and int(r["saved_bytes"]) > 0
    # torch.nn saves x, the conv output, the BN output and (in the next layer) the block's output;
    # an in-place LeakyReLU saves its output in place of the BN output
    # (plus the per-channel statistics: hence approx)
    saved = [float(rows[p]["saved_tensors"]) for p in ("torch", "torch-inplace", "bnlab-bn")]
    assert saved == pytest.approx([4.0, 3.0, 4.0], abs=0.01)
    assert (tmp_path / "abn_memory.md").read_text().startswith("| shape |")


def test_bn_speed_gpu_smoke_run_on_the_cpu_interpreter(tmp_path):
    out = run_script(
        "bn_speed_gpu.py",
        "--device",
        "cpu",
        "--shapes",
        "4x8x8x8",
        "--layouts",
        "channels_last",
        "--dtypes",
        "bfloat16",
        "--modes",
        "full",
        "--providers",
        "bnlab,torch",
        "--min-run-time",
        "0.01",
        "--out",
        str(tmp_path),
    )
    rows = read_rows(tmp_path / "bn_speed_gpu.csv")
    assert [(r["mode"], r["provider"], r["backend"]) for r in rows] == [
        ("copy", "copy", ""),
        ("full", "bnlab", "gpu"),
        ("full", "torch", ""),
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["shape"], r["layout"], r["dtype"]) == ("4x8x8x8", "channels_last", "bfloat16")
        assert float(r["median_ms"]) > 0 and float(r["copy_fraction"]) > 0
    assert "| 4x8x8x8 | channels_last | bfloat16 | full |" in out


def test_bn_speed_reruns_itself_with_the_allocator_asked_for(tmp_path):
    run_script(
        "bn_speed.py",
        "--shapes",
        "4x8x8x8",
        "--layouts",
        "contiguous",
        "--modes",
        "fwd",
        "--providers",
        "torch",
        "--min-run-time",
        "0.01",
        "--threads",
        "1",
        "--allocator",
        "thp",
        "--out",
        str(tmp_path),
    )
    rows = read_rows(tmp_path / "bn_speed.csv")
    assert {r["allocator"] for r in rows} == {"thp"} and all(r["status"] == "ok" for r in rows)


def test_dispatch_overhead_smoke_run_pairs_bnlab_with_torch(tmp_path):
    out = run_script(
        *("dispatch_overhead.py", "--shapes", "4x3", "--min-run-time", "0.01"),
        *("--sweep-mb", "1", "--cold-calls", "5", "--out", str(tmp_path)),
    )
    rows = read_rows(tmp_path / "dispatch_overhead.csv")
    assert [(r["mode"], r["caches"], r["provider"]) for r in rows] == [
        (mode, caches, provider)
        for mode in ("train", "eval", "act")
        for caches in ("warm", "cold")
        for provider in ("bnlab", "torch")
    ]
    assert all(float(r["median_us"]) > 0 for r in rows)
    assert {float(r["over_torch"]) for r in rows if r["provider"] == "torch"} == {1.0}
    assert "appended to" in out


def test_model_speed_smoke_run_pairs_every_provider_with_torch(tmp_path):
    out = run_script(
        "model_speed.py",
        *("--models", "mlp", "--sizes", "8", "--batch", "4", "--dtypes", "float32"),
        *("--layouts", "contiguous", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path)),
    )
    rows = read_rows(tmp_path / "model_speed.csv")
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (mode, provider)
        for mode in ("train", "eval")
        for provider in ("torch", "torch-copy", "bnlab", "bnlab-fused", "bnlab-inplace", "no-bn")
    ]
    assert all(float(r["median_ms"]) > 0 and float(r["paired_speedup"]) > 0 for r in rows)
    assert {float(r["paired_speedup"]) for r in rows if r["provider"] == "torch"} == {1.0}
    assert all(float(r["peak_mb"]) > 0 for r in rows if r["mode"] == "train")
    assert all(r["allocator"] == "default" and int(r["faults"]) >= 0 for r in rows)
    assert "appended to" in out
    csv_path = str(tmp_path / "model_speed.csv")
    run_script("plot_model_speed.py", "--csv", csv_path, "--out", str(tmp_path))
    assert (tmp_path / "model_speed.png").stat().st_size > 10_000


def test_model_speed_reruns_itself_with_the_allocator_asked_for(tmp_path):
    run_script(
        "model_speed.py",
        *("--models", "mlp", "--sizes", "8", "--batch", "4", "--dtypes", "float32"),
        *("--layouts", "contiguous", "--modes", "eval", "--providers", "torch,bnlab"),
        *("--rounds", "1", "--warmup", "0", "--allocator", "reuse", "--out", str(tmp_path)),
    )
    rows = read_rows(tmp_path / "model_speed.csv")
    assert [(r["provider"], r["allocator"]) for r in rows] == [
        ("torch", "reuse"),
        ("bnlab", "reuse"),
    ]


def test_model_speed_processes_give_the_median_over_fresh_processes(tmp_path):
    out = run_script(
        "model_speed.py",
        *("--models", "mlp", "--sizes", "8", "--batch", "4", "--dtypes", "float32"),
        *("--layouts", "contiguous", "--modes", "train", "--providers", "torch,torch-copy"),
        *("--rounds", "3", "--warmup", "1", "--processes", "3", "--out", str(tmp_path)),
    )
    rows = read_rows(tmp_path / "model_speed.csv")
    assert [(r["provider"], r["processes"]) for r in rows] == [("torch", "3"), ("torch-copy", "3")]
    assert out.count(f"appended to {tmp_path}") == 1  # the processes wrote their rows elsewhere
    low, mid, high = (float(rows[1][k]) for k in ("paired_min", "paired_speedup", "paired_max"))
    assert 0 < low <= mid <= high and float(rows[1]["peak_mb"]) > 0
    assert rows[0]["paired_min"] == rows[0]["paired_max"] == "1.0"


def test_model_speed_processes_take_the_providers_in_other_orders():
    sys.path.insert(0, str(BENCHMARKS))
    from model_speed import child_argv

    given = "torch,torch-copy,bnlab,bnlab-fused"
    args = dict(models="mlp", providers=given, processes=8, memory=False)
    argvs = [child_argv(args, "out", index) for index in range(8)]
    orders = [tuple(argv[argv.index("--providers") + 1].split(",")) for argv in argvs]
    assert orders[0] == tuple(given.split(","))  # the first process: as given
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    assert len(set(orders)) >= 4  # the others: several permutations
    followed = {(order[i - 1], order[i]) for order in orders for i in range(len(order))}
    assert len(followed) > len(orders[0])  # ... whose cyclic predecessors change, not rotations
    assert argvs == [child_argv(args, "out", index) for index in range(8)]  # the same each run
    assert all(argv[argv.index("--processes") + 1] == "1" for argv in argvs)
    assert args["providers"] == given  # the caller's options stay as given


def test_appended_rows_with_a_new_column_keep_the_older_rows(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from common import append_rows

    append_rows("t.csv", [{"a": 1, "b": 2}], tmp_path)
    append_rows("t.csv", [{"a": 3, "c": 4}], tmp_path)  # new column c, b missing
    append_rows("t.csv", [{"a": 5, "b": 6, "c": 7}], tmp_path)
    rows = read_rows(tmp_path / "t.csv")
    assert [(r["a"], r["b"], r["c"]) for r in rows] == [
        ("1", "2", ""),
        ("3", "", "4"),
        ("5", "6", "7"),
    ]
    assert list(rows[0])[:2] == ["timestamp", "machine"]


def test_model_speed_plot_keeps_allocators_apart():
    sys.path.insert(0, str(BENCHMARKS))
    from plot_model_speed import case_label, latest_rows

    row = dict(model="m", input="8x3x8x8", layout="contiguous", dtype="float32", mode="train")
    rows = [
        {**row, "timestamp": "1", "provider": "bnlab", "paired_speedup": "0.9"},  # no allocator
        {**row, "timestamp": "2", "provider": "bnlab", "paired_speedup": "1.1", "allocator": "thp"},
    ]
    latest = latest_rows(rows)
    assert {k[4]: v["paired_speedup"] for k, v in latest.items()} == {
        "default": "0.9",
        "thp": "1.1",
    }
    assert case_label(("m", "8x3x8x8", "contiguous", "float32", "thp")).endswith("float32 thp")


def test_model_speed_without_batch_norm_keeps_the_activation():
    sys.path.insert(0, str(BENCHMARKS))
    from model_speed import without_batch_norm

    class BatchNormAct(torch.nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.drop, self.act = torch.nn.Identity(), torch.nn.ReLU()

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), BatchNormAct(2), torch.nn.BatchNorm2d(2))
    x = torch.randn(1, 1, 3, 3)
    expected = torch.relu(model[0](x))
    without_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_zoo_coverage_smoke_run_counts_and_converts(tmp_path):
    out = run_script(
        "zoo_coverage.py", "--filter", "efficientnet_b0", "--limit", "1", "--out", str(tmp_path)
    )
    rows = read_rows(tmp_path / "zoo_coverage.csv")
    assert [(r["model"], r["status"], r["norm_class"]) for r in rows] == [
        ("efficientnet_b0", "ok", "timm.layers.norm_act.BatchNormAct2d")
    ]
    assert rows[0]["layers"] == rows[0]["converted"] == "49" and rows[0]["family"] == "batchnorm"
    assert "1 models, 0 not built" in out


def test_model_speed_other_ranks_run_in_the_layouts_they_have(tmp_path):
    out = run_script(
        "model_speed.py",
        *("--models", "pointnet,r3d_small,tabular", "--sizes", "8", "--batch", "2"),
        *("--dtypes", "float32"),
        *("--modes", "train", "--providers", "torch,bnlab,bnlab-fused", "--rounds", "1"),
        *("--warmup", "1", "--no-memory", "--out", str(tmp_path)),
    )
    rows = read_rows(tmp_path / "model_speed.csv")
    cases = [(r["model"], r["input"], r["layout"], r["provider"]) for r in rows]
    assert cases == [
        (model, shape, layout, provider)
        for model, shape, layout in (
            ("pointnet", "2x3x16", "contiguous"),
            ("r3d_small", "2x3x8x8x8", "contiguous"),
            ("r3d_small", "2x3x8x8x8", "channels_last"),
            ("tabular", "128x64", "contiguous"),
        )
        for provider in ("torch", "bnlab", "bnlab-fused")
    ]
    assert "pointnet: no channels_last layout for 3-d inputs, skipped" in out
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_model_speed_other_ranks_convert_every_batch_norm():
    sys.path.insert(0, str(BENCHMARKS))
    import bnlab
    from model_speed import build, model_input

    for name, rank, count in (
        ("pointnet", torch.nn.BatchNorm1d, 7),
        ("r3d_small", torch.nn.BatchNorm3d, 12),
        ("m5", torch.nn.BatchNorm1d, 4),
        ("tabular", torch.nn.BatchNorm1d, 3),
    ):
        model = build(name, 8)
        assert sum(type(m) is rank for m in model.modules()) == count
        converted = bnlab.convert(copy.deepcopy(model))
        assert not any(type(m) is rank for m in converted.modules())
        x = model_input(name, 8, 2)
        outputs = []
        for net in (converted, model):  # training mode: the same dropout draw for both
            torch.manual_seed(0)
            outputs.append(net(x))
        torch.testing.assert_close(*outputs)
