"""Compile every Triton kernel for an H100 (sm_90) without a GPU: Triton's compiler and ptxas run on
the CPU. Catches what the interpreter cannot (typing, constexpr specialization, register spills).

    python tests/kernels/triton_sm90.py  # prints one line per compiled variant; exit 1 on spills
                                         # (float32/bfloat16)

Run without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""

import itertools
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from bnlab.kernels import gpu as tk

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    "float32": ("fp32", tl.float32),
    "bfloat16": ("bf16", tl.float32),
    "float64": ("fp64", tl.float64),
}
ACC_BUFFERS = {
    "count_ptr",
    "mean_ptr",
    "m2_ptr",
    "sum_dz_ptr",
    "sum_dzx_ptr",
    "first_ptr",
    "second_ptr",
    "out_first_ptr",
    "out_second_ptr",
}
# (BLOCK_C, BLOCK_S, the stride fixed at 1) of the elementwise and the reduction tiles _Geometry
# picks for the two layouts
TILES = {"nchw": (1, tk._TILE, "ss"), "nhwc": (128, tk._TILE // 128, "sc")}
REDUCE_TILES = {"nchw": (1, tk._REDUCE_TILE, "ss"), "nhwc": (128, tk._REDUCE_TILE // 128, "sc")}


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    data, acc = TYPES[dtype]
    acc_type = "fp64" if acc == tl.float64 else "fp32"
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ACC_BUFFERS or (
            kernel is tk._grad_input_kernel and name in ("mean_ptr", "var_ptr")
        ):
            sig[name] = f"*{acc_type}"
        elif name.endswith("_ptr"):
            sig[name] = f"*{data}"
        elif name in ("eps", "param", "m"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants():
    """(kernel, dtype, constexprs): float32 and bfloat16 (float16 is the same code) over every tile
    shape, activation and flag; float64 with elu and gelu (exp, erf) per kernel and tile shape."""
    for dtype, layout in itertools.product(TYPES, TILES):
        tile, reduce_tile = (
            {"BLOCK_C": block_c, "BLOCK_S": block_s, unit: 1, "ACC": TYPES[dtype][1]}
            for block_c, block_s, unit in (TILES[layout], REDUCE_TILES[layout])
        )
        yield tk._stats_kernel, dtype, reduce_tile
        acts = range(len(tk.ACTIVATION_CODES)) if dtype != "float64" else (3, 7)  # elu, gelu
        for act in acts:
            flags = {"HAS_W": act % 2 == 0, "HAS_B": act < 2, "ACT": act}
            yield tk._normalize_kernel, dtype, {**tile, **flags}
            yield (
                tk._grad_sums_kernel,
                dtype,
                {**reduce_tile, **flags, "FROM_OUTPUT": act in (0, 2, 3)},
            )
            yield (
                tk._grad_input_kernel,
                dtype,
                {**tile, **flags, "FROM_OUTPUT": act == 2, "TRAINING": act != 3},
            )
    for acc, chan in itertools.product((tl.float32, tl.float64), (True, False)):
        merge = {"CHAN": chan, "ACC": acc, "BLOCK_C": tk._MERGE_BLOCK}
        yield tk._merge_kernel, "float64" if acc == tl.float64 else "float32", merge


def resources(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) from Triton's own ptxas."""
    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return regs, spilled


def main() -> int:
    spills = 0
    for kernel, dtype, constexprs in variants():
        sig = signature(kernel, dtype, constexprs)
        warps = tk._launch(constexprs.get("BLOCK_C", 1), constexprs.get("BLOCK_S", 1))["num_warps"]
        compiled = triton.compile(
            ASTSource(kernel, sig, constexprs=constexprs),
            target=TARGET,
            options={"num_warps": warps},
        )
        n_regs, n_spills = resources(compiled.asm["ptx"])
        spills += n_spills if dtype != "float64" else 0  # float64 is for checking, not for speed
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("ACC",))
        print(f"{kernel.fn.__name__:22s} {dtype:9s} {flags:60s} regs {n_regs} spills {n_spills}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
