"""Whole training steps and eval forwards of real models: torch.nn against bnlab, paired.

    python benchmarks/model_speed.py                       # -> results/model_speed.csv
    python benchmarks/model_speed.py --models resnet50,densenet121 --sizes 224 --batch 8

What a user sees when they swap bnlab in: one training step (forward, backward, SGD step with
momentum) and one eval forward (``torch.no_grad``) of each model, per provider:

  torch        the model as built (torch.nn's batch norm)
  torch-copy   a second copy of it, unchanged: the control. Its paired ratio is what timing
               alone gives two equal models in one run (the machine's noise, the order, where
               the allocator puts their tensors): a provider's ratio means something only as far
               as it stands outside the control's distance from 1.0
  bnlab        ``bnlab.convert(model)`` with its defaults
  bnlab-fused  ``bnlab.convert(model, fuse_activations=True)``: also each batch norm with the
               ReLU module after it (bnlab.nn.fuse)
  bnlab-inplace ``bnlab.convert(model, inplace_abn=True)``: in-place activated batch norm after
               each conv (ReLU -> leaky_relu(0.01), |gamma| + eps: another function, for memory)
  no-bn        every batch norm replaced by an identity (activations kept): the ceiling a batch
               norm kernel could reach, so ``1 - no-bn / torch`` is batch norm's share of the step

Models: timm's architectures when timm is installed (``--models``, default resnet18, resnet50,
efficientnet_b0, mobilenetv3_large_100, densenet121), ``mlp`` (a 3-layer BatchNorm1d MLP on
flattened images), and four of other shapes named only when asked: ``pointnet`` (BatchNorm1d on
(N, C, points), size**2 / 4 points), ``m5`` (BatchNorm1d on raw audio, size * 250 samples),
``r3d_small`` (BatchNorm3d, clips of 8 frames) and ``tabular`` (BatchNorm1d(16) over batch * size**2
rows); at each ``--sizes`` (square images, 3 channels, ``--batch`` each), in NCHW and channels_last
(``--layouts``; channels_last_3d for clips, none for point sets, audio and rows) and in float32 and
CPU bfloat16 autocast (``--dtypes``).

Method: every provider's model is a deep copy of the same initialized model. After ``--warmup``
steps each, ``--rounds`` interleaved rounds run one step of every provider (the order rotates
each round); a row gives each provider's median step time and the median over rounds of the
paired ratio torch / provider (> 1: faster than torch.nn). With ``--processes K`` the whole run
is repeated in K fresh processes, each after the first taking the providers in another order
(which model is built first and which one each follows), and a row gives the medians over them,
with the lowest and highest process's paired ratio (``paired_min``, ``paired_max``). ``peak_mb``
is the peak of live CPU allocations during one training step (torch.profiler's allocation events,
see ``common.peak_bytes``), above the level at its start. ``faults`` is the median number of minor
page faults a step took (first touches of memory the allocator got fresh from the system): the cost
that differs most between allocators, and between two models whose tensors the allocator places
differently.

Allocator (``--allocator``, column ``allocator``): ``default`` (the headline) runs glibc's
malloc as it is, as a user does; ``reuse`` raises glibc's mmap / trim thresholds, ``thp`` sets
PyTorch's THP_MEM_ALLOC_ENABLE=1 and ``jemalloc`` preloads jemalloc told to keep freed pages (see
bn_speed.py). The script re-runs itself under the settings asked for.

``--cold-start`` adds rows with the time of the first training forward of a BatchNorm2d in a new
process (import excluded): mode ``first-call`` as a script would see it, and
``first-call-collected`` after a full ``gc.collect()``. The imports of torch and bnlab leave
hundreds of thousands of new objects behind; whichever call next allocates many objects (bnlab's
first Numba kernel load does) triggers the full collection they have made due (60-80 ms on the
2-core machine). The second mode is bnlab's own cost.
"""

from __future__ import annotations

import copy
import csv
import gc
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import click
import torch
from torch import nn

from common import ALLOCATORS, MEMORY_FORMAT, append_rows, ensure_allocator, peak_bytes

PROVIDERS = ("torch", "torch-copy", "bnlab", "bnlab-fused", "bnlab-inplace", "no-bn")
TIMM_MODELS = ("resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_large_100", "densenet121")


def import_timm():
    """timm, through the tests' torchvision stand-in when the installed torchvision cannot load."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from torchvision_standin import import_timm as load

    return load()


def mlp(num_classes: int) -> nn.Module:
    """A 3-layer BatchNorm1d MLP on flattened images (its first width is set by the first call)."""
    return nn.Sequential(
        nn.Flatten(),
        *[m for width in (512, 256) for m in (nn.LazyLinear(width), nn.BatchNorm1d(width))],
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def pointnet(num_classes: int) -> nn.Module:
    """PointNet's classifier (Qi et al. 2017, Section 4.2, without the alignment networks): shared
    per-point MLPs as 1x1 Conv1d + BatchNorm1d on (N, C, points), a max pool over the points,
    then Linear + BatchNorm1d on (N, C)."""

    def block(layer, width):
        return [layer, nn.BatchNorm1d(width), nn.ReLU()]

    widths = (3, 64, 64, 64, 128, 1024)
    points = [m for a, b in zip(widths, widths[1:]) for m in block(nn.Conv1d(a, b, 1), b)]
    return nn.Sequential(
        *points,
        nn.AdaptiveMaxPool1d(1),
        nn.Flatten(),
        *block(nn.Linear(1024, 512), 512),
        *block(nn.Linear(512, 256), 256),
        nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )


class BasicBlock3d(nn.Module):
    """A video ResNet's residual unit (Tran et al. 2018, R3D): two 3x3x3 convs with BatchNorm3d."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout)
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


def r3d_small(num_classes: int) -> nn.Module:
    """R3D (torchvision's r3d_18 layout) at a quarter of its widths, one unit a stage."""
    return nn.Sequential(
        nn.Conv3d(3, 16, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
        nn.BatchNorm3d(16),
        nn.ReLU(inplace=True),
        BasicBlock3d(16, 16, 1),
        BasicBlock3d(16, 32, 2),
        BasicBlock3d(32, 64, 2),
        BasicBlock3d(64, 128, 2),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def m5(num_classes: int) -> nn.Module:
    """M5, a CNN on raw audio (Dai et al. 2017, Table 1): Conv1d (80 taps, stride 4) then three
    3-tap Conv1d, each with BatchNorm1d over (N, C, samples), ReLU and a max pool of 4."""
    layers, widths = [], (1, 128, 128, 256, 512)
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        conv = nn.Conv1d(a, b, 80, 4, 38) if i == 0 else nn.Conv1d(a, b, 3, padding=1)
        layers += [conv, nn.BatchNorm1d(b), nn.ReLU(), nn.MaxPool1d(4)]
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(512, num_classes)
    )


def tabular(num_classes: int, features: int = 64, width: int = 16) -> nn.Module:
    """An MLP for tabular data trained on large batches: three Linear + BatchNorm1d + ReLU of
    ``width`` over (rows, features)."""
    layers = []
    for a in (features, width, width):
        layers += [nn.Linear(a, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


OWN_MODELS = {
    "mlp": mlp,
    "pointnet": pointnet,
    "r3d_small": r3d_small,
    "m5": m5,
    "tabular": tabular,
}
FRAMES = 8  # r3d_small's clip length


def build(name: str, size: int, num_classes: int = 10) -> nn.Module:
    """A freshly initialized model (seed 0)."""
    torch.manual_seed(0)
    if name in OWN_MODELS:
        return OWN_MODELS[name](num_classes)
    return import_timm().create_model(name, pretrained=False, num_classes=num_classes)


def model_input(name: str, size: int, batch: int) -> torch.Tensor:
    """Images (batch, 3, size, size); for ``pointnet`` size**2 / 4 points (batch, 3, points), for
    ``r3d_small`` clips of FRAMES frames (batch, 3, FRAMES, size, size), for ``m5`` size * 250
    audio samples (batch, 1, samples: one second at 16 kHz for size 64), for ``tabular``
    batch * size**2 rows of 64 features."""
    if name == "pointnet":
        return torch.randn(batch, 3, size * size // 4)
    if name == "r3d_small":
        return torch.randn(batch, 3, FRAMES, size, size)
    if name == "m5":
        return torch.randn(batch, 1, size * 250)
    if name == "tabular":
        return torch.randn(batch * size * size, 64)
    return torch.randn(batch, 3, size, size)


def memory_format_of(layout: str, x: torch.Tensor) -> torch.memory_format | None:
    """The layout's memory format for an input of x's rank; None where it has none (a
    channels_last (N, C, L) tensor does not exist)."""
    if layout != "channels_last":
        return torch.contiguous_format
    return MEMORY_FORMAT.get(x.dim())


def without_batch_norm(model: nn.Module) -> nn.Module:
    """Every batch-norm module replaced by an identity; a BN subclass that also applies an
    activation (timm's BatchNormAct2d) keeps it (its ``drop`` and ``act`` children)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            tail = [getattr(child, key) for key in ("drop", "act") if hasattr(child, key)]
            setattr(model, name, nn.Sequential(*tail) if tail else nn.Identity())
        else:
            without_batch_norm(child)
    return model


def provider_model(provider: str, base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    if provider.startswith("bnlab"):
        import bnlab

        with warnings.catch_warnings():  # in-place ABN's changed function is this provider's point
            warnings.simplefilter("ignore", bnlab.ConversionWarning)
            return bnlab.convert(
                model,
                fuse_activations=provider == "bnlab-fused",
                inplace_abn=provider == "bnlab-inplace",
            )
    if provider == "no-bn":
        return without_batch_norm(model)
    return model  # torch, torch-copy


class Workload:
    """One provider's model, optimizer and inputs; ``train_step()`` and ``eval_forward()``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: str):
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        )

    def train_step(self) -> None:
        self.model.train()
        with self.autocast:
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def eval_forward(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            self.model(self.x)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def paired_times(work: dict[str, Workload], mode: str, rounds: int, warmup: int) -> tuple:
    """Per provider: all step times (ms) over ``rounds`` interleaved rounds, after warm-up, and
    the minor page faults of each of those steps."""
    method = "train_step" if mode == "train" else "eval_forward"
    step = {p: getattr(w, method) for p, w in work.items()}
    for fn in step.values():
        for _ in range(warmup):
            fn()
    times = {p: [] for p in work}
    faults = {p: [] for p in work}
    order = list(work)
    for r in range(rounds):
        for p in order[r % len(order) :] + order[: r % len(order)]:
            first_faults, start = minor_faults(), time.perf_counter()
            step[p]()
            times[p].append((time.perf_counter() - start) * 1e3)
            faults[p].append(minor_faults() - first_faults)
    return times, faults


def show(row: dict) -> None:
    print(" ".join(f"{v}" for v in row.values()), flush=True)


def case_rows(name: str, size: int, batch: int, layout: str, dtype: str, opts: dict) -> list[dict]:
    x = model_input(name, size, batch)
    memory_format = memory_format_of(layout, x)
    if memory_format is None:
        print(f"{name}: no {layout} layout for {x.dim()}-d inputs, skipped", flush=True)
        return []
    y = torch.randint(0, 10, (x.shape[0],))
    base = build(name, size)
    base(x[:2])  # materializes lazy layers
    x = x.contiguous(memory_format=memory_format)
    work = {}
    for p in opts["providers"]:
        model = provider_model(p, base).to(memory_format=memory_format)
        work[p] = Workload(model, x, y, dtype)
    rows = []
    for mode in opts["modes"]:
        times, faults = paired_times(work, mode, opts["rounds"], opts["warmup"])
        for p in work:
            speedup = round(statistics.median(t / s for t, s in zip(times["torch"], times[p])), 3)
            peak = ""
            if mode == "train" and opts["memory"]:
                gc.collect()
                peak = round(peak_bytes(work[p].train_step) / 2**20, 1)
            rows.append(
                dict(
                    model=name,
                    input="x".join(map(str, x.shape)),
                    layout=layout,
                    dtype=dtype,
                    threads=torch.get_num_threads(),
                    allocator=opts["allocator"],
                    mode=mode,
                    provider=p,
                    median_ms=round(statistics.median(times[p]), 3),
                    paired_speedup=speedup,
                    peak_mb=peak,
                    faults=round(statistics.median(faults[p])),
                    rounds=opts["rounds"],
                    processes=1,
                    paired_min=speedup,  # one process: its own ratio
                    paired_max=speedup,
                )
            )
            show(rows[-1])
    return rows


COLD_START = """
import gc, time, torch, bnlab.nn
x = torch.randn({shape})
bn = {cls}(x.shape[1])
{prepare}
start = time.perf_counter()
bn(x)
print((time.perf_counter() - start) * 1e3)
"""
# a small layer (ATen's kernels) and a large one (bnlab's Numba kernels, loaded from their cache)
COLD_START_SHAPES = ("8, 16, 8, 8", "8, 64, 64, 64")


def cold_start_rows(repeats: int, allocator: str) -> list[dict]:
    """The first training forward of a BatchNorm2d in a new process (after the imports)."""
    rows = []
    classes = (("torch", "torch.nn.BatchNorm2d"), ("bnlab", "bnlab.nn.BatchNorm2d"))
    modes = (("first-call", ""), ("first-call-collected", "gc.collect()"))
    cases = [(s, m, c) for m in modes for s in COLD_START_SHAPES for c in classes]
    for shape, (mode, prepare), (provider, cls) in cases:
        script = COLD_START.format(cls=cls, shape=shape, prepare=prepare)
        runs = [
            float(subprocess.check_output([sys.executable, "-c", script])) for _ in range(repeats)
        ]
        rows.append(
            dict(
                model="BatchNorm2d",
                input=shape.replace(", ", "x"),
                layout="contiguous",
                dtype="float32",
                threads=torch.get_num_threads(),
                allocator=allocator,
                mode=mode,
                provider=provider,
                median_ms=round(statistics.median(runs), 3),
                paired_speedup="",
                peak_mb="",
                faults="",
                rounds=repeats,
                processes=1,
                paired_min="",
                paired_max="",
            )
        )
        show(rows[-1])
    return rows


KEY = ("model", "input", "layout", "dtype", "threads", "allocator", "mode", "provider")


def child_argv(args: dict, out: str, index: int = 0) -> list[str]:
    """This script's options for process ``index`` of a --processes run (no cold start, rows to
    out). The first process takes the providers in the order given, each later one in another
    (a permutation seeded by ``index``): which model is built first (where its tensors lie) and
    which one each follows in a round change from process to process, so that no provider keeps
    the same place in every process's allocator."""
    argv = [__file__, "--processes", "1", "--cold-start", "0", "--out", out]
    argv.append("--memory" if args["memory"] else "--no-memory")
    providers = split(args["providers"])
    if index:
        providers = random.Random(index).sample(providers, len(providers))
    for key, value in {**args, "providers": ",".join(providers)}.items():
        if key not in ("processes", "cold_start", "out", "memory"):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def combine(runs: list[dict], processes: int) -> list[dict]:
    """One row per case, mode and provider from the rows of ``processes`` runs: the medians over
    the processes, and the lowest and highest paired speed-up of a process."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault(tuple(row[k] for k in KEY), []).append(row)
    rows = []
    for group in groups.values():
        speedups = [float(r["paired_speedup"]) for r in group]
        peaks = [float(r["peak_mb"]) for r in group if r["peak_mb"]]
        rows.append(
            {
                **{k: group[0][k] for k in KEY},
                "median_ms": round(statistics.median(float(r["median_ms"]) for r in group), 3),
                "paired_speedup": round(statistics.median(speedups), 3),
                "peak_mb": round(statistics.median(peaks), 1) if peaks else "",
                "faults": round(statistics.median(int(r["faults"]) for r in group)),
                "rounds": group[0]["rounds"],
                "processes": processes,
                "paired_min": min(speedups),
                "paired_max": max(speedups),
            }
        )
        show(rows[-1])
    return rows


def rows_in_processes(args: dict) -> list[dict]:
    """Every case in ``--processes`` fresh processes, one after the other: where the allocator
    places two equal models' tensors differs by process, and moves their paired ratio by several
    percent (see ``faults``), so the median over processes is the figure to quote. Each process
    takes the providers in another order (see :func:`child_argv`)."""
    with tempfile.TemporaryDirectory() as out:
        for index in range(args["processes"]):
            subprocess.run([sys.executable, *child_argv(args, out, index)], check=True)
        with (Path(out) / "model_speed.csv").open(newline="") as f:
            runs = list(csv.DictReader(f))
    print(f"median over {args['processes']} processes:")
    return combine(runs, args["processes"])


def split(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


@click.command(help=__doc__.splitlines()[0])
@click.option("--models", default=",".join((*TIMM_MODELS, "mlp")), help="comma-separated")
@click.option("--sizes", default="64,224", help="square input sizes, comma-separated")
@click.option("--batch", default=16, show_default=True, help="images per step")
@click.option("--layouts", default="contiguous,channels_last", show_default=True)
@click.option("--dtypes", default="float32,bf16", show_default=True, help="bf16: CPU autocast")
@click.option("--modes", default="train,eval", show_default=True)
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option("--rounds", default=10, show_default=True, help="interleaved rounds per case")
@click.option("--warmup", default=2, show_default=True, help="steps per provider before timing")
@click.option("--threads", default=0, help="torch threads (0: torch's default)")
@click.option("--memory/--no-memory", default=True, help="peak memory of one training step")
@click.option(
    "--allocator",
    type=click.Choice(ALLOCATORS),
    default="default",
    show_default=True,
    help="glibc as is (default), or an allocator setting (see the module docstring)",
)
@click.option(
    "--processes",
    default=1,
    show_default=True,
    help="fresh processes per case, one after the other; rows give the median over them",
)
@click.option("--cold-start", default=0, help="new processes timing a first call (0: none)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="CSV directory")
def main(**args):
    ensure_allocator(args["allocator"])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    opts = {key: args[key] for key in ("rounds", "warmup", "memory", "allocator")}
    opts.update(providers=split(args["providers"]), modes=split(args["modes"]))
    if "torch" not in opts["providers"]:
        raise click.BadParameter("the paired ratios need 'torch'", param_hint="--providers")
    if args["processes"] > 1:
        rows = rows_in_processes(args)
    else:
        rows = []
        for name in split(args["models"]):
            for size in map(int, split(args["sizes"])):
                for layout in split(args["layouts"]):
                    for dtype in split(args["dtypes"]):
                        rows += case_rows(name, size, args["batch"], layout, dtype, opts)
    if args["cold_start"]:
        rows += cold_start_rows(args["cold_start"], args["allocator"])
    print("appended to", append_rows("model_speed.csv", rows, args["out"]))


if __name__ == "__main__":
    main()
