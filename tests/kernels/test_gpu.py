"""The Triton kernels (on a GPU when there is one, else in Triton's interpreter on the CPU): the
(N, C, S) views, split reductions merged exactly, half types, strided inputs, the registry, and
compilation for an H100. What every backend must do alike is in test_contract.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnlab
import kernel_cases
from bnlab.kernels import composite
from bnlab.kernels import gpu as tk
from kernel_cases import LAYOUTS, assert_results_close
from tolerances import assert_statistics_within

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(name, dtype=torch.float64, seed=0, loc=1.0):
    return kernel_cases.make(name, dtype, seed, loc, DEVICE)


def params(c, dtype):
    return kernel_cases.params(c, dtype, DEVICE)


@pytest.fixture
def many_splits(monkeypatch):
    """Reductions cut into as many programs as there are tiles: every merge path runs."""
    monkeypatch.setattr(tk, "_programs", lambda device: 1 << 20)


def test_geometry_views_without_copies():
    nchw = tk._Geometry(make("nchw"))
    assert (nchw.n, nchw.c, nchw.s, nchw.strides) == (4, 5, 42, (210, 42, 1))
    nhwc = tk._Geometry(make("nhwc"))  # channels innermost: one row of C per position
    assert (nhwc.n, nhwc.c, nhwc.s, nhwc.strides) == (1, 5, 168, (0, 1, 5))
    nc = tk._Geometry(make("nc"))
    assert (nc.n, nc.s, nc.strides) == (1, 64, (0, 1, 5))
    few = tk._Geometry(torch.empty(2, 1, 96, 96, device=DEVICE))
    assert few.splits > 1  # one channel still spread over several programs


@pytest.mark.parametrize("split", [False, True], ids=["default", "many_splits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_statistics_match_reference(name, dtype, split, request):
    if split:
        request.getfixturevalue("many_splits")
    x = make(name, dtype)
    mean, var = tk._statistics(x, tk._Geometry(x))
    assert_statistics_within(mean, var, x)


@pytest.mark.parametrize(
    "output_mask", [(True, False, False), (False, True, True), (True, True, False)], ids=str
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_mask_leaves_out_what_is_not_wanted(output_mask, training):
    x, dy = make("nchw"), make("nchw", seed=1)
    w, _, rm, rv = params(x.shape[1], x.dtype)
    mean, var = (None, None) if training else (rm, rv)  # training: recomputed from x
    ours = tk.batch_norm_backward(dy, x, w, mean, var, training, 1e-5, output_mask)
    theirs = composite.batch_norm_backward(dy, x, w, mean, var, training, 1e-5, output_mask)
    assert_results_close(ours, theirs, dict(atol=1e-12, rtol=1e-12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["nc", "nchw", "nhwc"])
def test_half_types_compute_in_float32(name, dtype, many_splits):
    """Half inputs: statistics and parameter gradients in float32, outputs rounded once."""
    x, dy = make(name, dtype), make(name, dtype, seed=1)
    w, b, _, _ = params(x.shape[1], torch.float32)
    ours = tk.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "leaky_relu", 0.1)
    theirs = composite.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "leaky_relu", 0.1)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert_results_close(ours, theirs, dict(atol=2 * ulp, rtol=2 * ulp))
    assert_results_close(
        *[
            k.batch_norm_act_backward(dy, x, w, b, ours[1], ours[2], True, 1e-5, "leaky_relu", 0.1)
            for k in (tk, composite)
        ],
        dict(atol=4 * ulp, rtol=4 * ulp),
    )


def test_a_strided_view_is_copied_once_and_laid_out_as_empty_like():
    base = make("nchw")
    x = base[:, :, ::2]  # not dense: the kernels run on a contiguous copy
    w, b, _, _ = params(x.shape[1], x.dtype)
    ours = tk.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "relu")
    theirs = composite.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "relu")
    assert_results_close(ours, theirs, dict(atol=1e-12, rtol=1e-12))
    out = torch.empty_like(x)
    assert tk.batch_norm_act_forward(x, w, b, None, None, True, 1e-5, "relu", out=out)[0] is out
    torch.testing.assert_close(out, theirs[0], atol=1e-12, rtol=1e-12)


def test_registry_runs_it_by_name_only_until_measured_on_a_gpu():
    assert "gpu" in bnlab.kernels.available_backends()
    x = make("nchw")
    for op in ("batch_norm", "batch_norm_eval", "batch_norm_act"):
        assert tk.supports(op, x)
    assert not tk.supports("batch_norm_masked", x) and not tk.supports("layer_norm", x)
    assert not tk.supports("batch_norm", x.long()) and not tk.supports("batch_norm", x[:0])
    assert bnlab.kernels.select_backend("batch_norm", x, "gpu").module is tk
    assert bnlab.kernels.select_backend("batch_norm", x).module is not tk  # CUDA: native
    y = bnlab.functional.batch_norm(x, None, None, training=True, backend="gpu")
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_batches_too_large_for_a_grid_axis_are_left_to_other_backends():
    assert not tk.supports("batch_norm", torch.empty(65536, 1, 2, 1, device=DEVICE))
    assert tk.supports("batch_norm", torch.empty(65536, 3, device=DEVICE))  # (N, C): N is no axis


def test_kernels_compile_for_an_h100_without_register_spills():
    """Triton's compiler and ptxas for sm_90a on the CPU: what the interpreter cannot check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "triton_sm90.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = result.stdout.splitlines()
    assert len(compiled) >= 40 and all("spills" in line for line in compiled)
