"""Activation memory of conv + BN + LeakyReLU(0.01) blocks in training, on the CPU.

    python benchmarks/abn_memory.py      # -> benchmarks/results/abn_memory.csv and abn_memory.md

The stack: ``depth`` blocks x -> Conv2d(C, C, 3, padding=1, bias=False) -> BN -> LeakyReLU(0.01),
then a stand-in for the next layer (``NextLayer``) that saves the stack's output, as a conv would,
and passes a fixed upstream gradient ``dy`` back. One training step = forward + backward.

Providers (the BN + activation of each block):
  torch          torch.nn.BatchNorm2d + torch.nn.LeakyReLU
  torch-inplace  torch.nn.BatchNorm2d + torch.nn.LeakyReLU(inplace=True) (the best torch.nn can do)
  bnlab-bn       bnlab.nn.BatchNorm2d + torch.nn.LeakyReLU
  bnlab-act      bnlab.nn.BatchNormAct2d(activation="leaky_relu"), fused
  bnlab-iabn     bnlab.nn.InPlaceABN2d: overwrites the conv output, saves only its own output

Measured, each in its own step after a warm-up step (parameter gradients already exist, so both
exclude them; x, dy and the parameters are allocated before and not counted):

- ``saved_bytes``: bytes saved for backward, from ``torch.autograd.graph.saved_tensors_hooks``:
  the sum over unique storages of every tensor any autograd node saves (the stack's input x and the
  output kept by NextLayer included), parameters excluded. This is what a deep network holds per
  block between its forward and its backward.
- ``peak_bytes``: the peak of live CPU allocations during the step, above the level at its start:
  the running sum of the allocation and free events recorded by ``torch.profiler`` with
  ``profile_memory=True``, in time order. ``check_method`` verifies that it reports exactly N bytes
  for one N-byte tensor, and the larger of two when one is freed before the other is allocated.
  Memory allocated outside torch's allocator (e.g. NumPy arrays inside a kernel) is not seen.

Both are also given in units of one activation tensor (``*_tensors``) and as a ratio to ``torch``.
"""

from __future__ import annotations

import gc

import click
import torch
from torch import nn

from common import append_rows, parse_shape, peak_bytes, shape_name

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14)]
PROVIDERS = ("torch", "torch-inplace", "bnlab-bn", "bnlab-act", "bnlab-iabn")
SLOPE = 0.01


def norm_act(provider: str, c: int) -> nn.Module:
    """The BN + LeakyReLU of one block; bnlab's modules are imported lazily."""
    if provider.startswith("torch"):
        return nn.Sequential(
            nn.BatchNorm2d(c), nn.LeakyReLU(SLOPE, inplace=provider.endswith("inplace"))
        )
    import bnlab.nn

    if provider == "bnlab-bn":
        return nn.Sequential(bnlab.nn.BatchNorm2d(c), nn.LeakyReLU(SLOPE))
    if provider == "bnlab-act":
        return bnlab.nn.BatchNormAct2d(c, activation="leaky_relu", activation_param=SLOPE)
    return bnlab.nn.InPlaceABN2d(c, activation="leaky_relu", activation_param=SLOPE)


def stack(provider: str, c: int, depth: int) -> nn.Module:
    return nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), norm_act(provider, c))
            for _ in range(depth)
        ]
    )


class NextLayer(torch.autograd.Function):
    """The layer after the stack: saves its input (as a conv would) and returns a fixed gradient."""

    @staticmethod
    def forward(ctx, y, dy):
        ctx.save_for_backward(y)
        ctx.dy = dy
        return y.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return ctx.dy, None


def train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Forward + backward; the stack's output is referenced only by the graph (no Python name)."""
    NextLayer.apply(model(x), dy).backward()


def saved_bytes(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages saved for backward during one step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, x, dy)
    return sum(storages.values())


def check_method(n: int = 1 << 20) -> None:
    """peak_bytes must see exactly one N-byte tensor, and the larger of two sequential ones."""

    def one():
        t = torch.empty(n, dtype=torch.uint8)
        del t

    def two_sequential():
        a = torch.empty(n, dtype=torch.uint8)
        del a
        b = torch.empty(2 * n, dtype=torch.uint8)
        del b

    measured = (peak_bytes(one), peak_bytes(two_sequential))
    if measured != (n, 2 * n):
        raise RuntimeError(f"peak_bytes reports {measured}, expected {(n, 2 * n)}")


def measure(provider: str, shape: tuple[int, ...], depth: int) -> dict:
    """saved_bytes and peak_bytes of one training step of the stack (after a warm-up step)."""
    torch.manual_seed(0)
    model = stack(provider, shape[1], depth).train()
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    train_step(model, x, dy)  # warm-up: JIT compilation, parameter gradients allocated
    gc.collect()
    saved = saved_bytes(model, x, dy)
    gc.collect()
    peak = peak_bytes(lambda: train_step(model, x, dy))
    return {"saved_bytes": saved, "peak_bytes": peak}


COLUMNS = (
    "saved_bytes",
    "peak_bytes",
    "saved_tensors",
    "peak_tensors",
    "saved_vs_torch",
    "peak_vs_torch",
)


def run(shapes, depths, providers, threads: int) -> list[dict]:
    rows = []
    for shape in shapes:
        tensor = torch.Size(shape).numel() * 4  # one float32 activation
        for depth in depths:
            base = None
            for provider in providers:
                r = {
                    "shape": shape_name(shape),
                    "depth": depth,
                    "provider": provider,
                    "threads": threads,
                    "tensor_bytes": tensor,
                }
                try:
                    m = measure(provider, shape, depth)
                except AttributeError as error:  # a module this bnlab does not have yet
                    rows.append(
                        {**r, **dict.fromkeys(COLUMNS, ""), "status": f"unavailable: {error}"}
                    )
                    print(format_row(rows[-1]), flush=True)
                    continue
                base = m if provider == "torch" else base
                rows.append({**r, **derived(m, tensor, base), "status": "ok"})
                print(format_row(rows[-1]), flush=True)
    return rows


def derived(m: dict, tensor: int, base: dict | None) -> dict:
    """The measurement, in activation tensors and as a ratio to torch.nn's (if measured)."""
    out = {
        **m,
        "saved_tensors": round(m["saved_bytes"] / tensor, 3),
        "peak_tensors": round(m["peak_bytes"] / tensor, 3),
    }
    for k in ("saved", "peak"):
        out[f"{k}_vs_torch"] = round(m[f"{k}_bytes"] / base[f"{k}_bytes"], 3) if base else ""
    return out


def format_row(r: dict) -> str:
    head = f"{r['shape']:>14s} depth {r['depth']} {r['provider']:13s}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return (
        f"{head} saved {r['saved_bytes'] / 2**20:8.1f} MiB ({r['saved_tensors']:.2f} tensors)"
        f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB ({r['peak_tensors']:.2f} tensors)"
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | depth | provider | saved MiB | saved / torch | peak MiB | peak / torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['depth']} | {r['provider']} | {r['status']} ||||")
            continue
        ratio = {
            k: f"{r[f'{k}_vs_torch']:.2f}" if r[f"{k}_vs_torch"] != "" else "-"
            for k in ("saved", "peak")
        }
        lines.append(
            f"| {r['shape']} | {r['depth']} | {r['provider']} | "
            f"{r['saved_bytes'] / 2**20:.1f} | {ratio['saved']} | "
            f"{r['peak_bytes'] / 2**20:.1f} | {ratio['peak']} |"
        )
    return "\n".join(lines)


@click.command()
@click.option(
    "--shapes",
    default=",".join(map(shape_name, SHAPES)),
    show_default=True,
    help="Comma-separated NxCxHxW input shapes (float32).",
)
@click.option("--depths", default="1,4", show_default=True, help="Blocks per stack.")
@click.option("--providers", default=",".join(PROVIDERS), show_default=True)
@click.option("--threads", default=None, type=int, help="torch.set_num_threads (default: torch's).")
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory for abn_memory.csv and abn_memory.md (default benchmarks/results).",
)
def main(shapes, depths, providers, threads, out) -> None:
    """Measure saved and peak activation memory per provider; append to abn_memory.csv."""
    chosen = [p for p in providers.split(",") if p]
    unknown = set(chosen) - set(PROVIDERS)
    if unknown:
        raise click.BadParameter(
            f"unknown providers {sorted(unknown)}; expected some of {PROVIDERS}"
        )
    providers = [p for p in PROVIDERS if p in chosen]  # torch first: the others' ratios need it
    if threads:
        torch.set_num_threads(threads)
    check_method()
    rows = run(
        [parse_shape(s) for s in shapes.split(",")],
        [int(d) for d in depths.split(",")],
        providers,
        torch.get_num_threads(),
    )
    path = append_rows("abn_memory.csv", rows, out)
    text = markdown(rows)
    path.with_suffix(".md").write_text(text + "\n")
    print(f"\nappended to {path}\n\n{text}")


if __name__ == "__main__":
    main()
