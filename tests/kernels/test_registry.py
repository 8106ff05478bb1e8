"""The backend registry: argument > BNLAB_BACKEND > automatic; named backends that cannot run
raise."""

import os
import re
import subprocess
import sys
import types

import pytest
import torch

import bnlab
from bnlab import kernels
from bnlab.kernels import composite, native


@pytest.fixture
def float64_only_backend():
    """A registered backend that wraps the composite one, runs float64 only, and counts its
    calls."""
    calls = []

    def forward(*args):
        calls.append("forward")
        return composite.batch_norm_forward(*args)

    def backward(*args):
        calls.append("backward")
        return composite.batch_norm_backward(*args)

    module = types.SimpleNamespace(batch_norm_forward=forward, batch_norm_backward=backward)
    kernels.register_backend(
        "f64only",
        module,
        lambda op, x: op in ("batch_norm", "batch_norm_backward") and x.dtype == torch.float64,
        priority=100,
    )
    yield calls
    kernels.unregister_backend("f64only")
    assert "f64only" not in kernels.available_backends()


def test_torch_backend_is_always_there():
    assert "composite" in kernels.available_backends()
    assert kernels.select_backend("batch_norm_masked", torch.randn(2, 3)).module is composite
    assert kernels.select_backend("layer_norm", torch.randn(2, 3)).module is composite


def test_numba_backend_is_preferred_for_what_it_runs():
    from bnlab.kernels import cpu

    for x in (
        torch.randn(2**19, 3),
        torch.randn(128, 3, 64, 64).to(memory_format=torch.channels_last),
        torch.empty(256, 8, 1024, dtype=torch.float64),
    ):
        assert kernels.select_backend("batch_norm", x).module is cpu
        assert kernels.select_backend("batch_norm_act", x).module is cpu
    tiny = torch.randn(2, 3, 4)  # the per-call cost decides: ATen's kernels, unless named
    assert kernels.select_backend("batch_norm", tiny).module is native
    assert kernels.select_backend("batch_norm_act", tiny).module is native
    assert kernels.select_backend("batch_norm", tiny, "cpu").module is cpu
    assert kernels.select_backend("batch_norm_act", tiny, "cpu").module is cpu
    # strided views and empty tensors: ATen's kernels; masked statistics: the composite backend
    for x in (torch.randn(3, 2).t(), torch.randn(4, 3, 6)[:, :, ::2]):
        assert kernels.select_backend("batch_norm", x).module is native
    assert kernels.select_backend("batch_norm", torch.randn(0, 3)).module is composite
    assert kernels.select_backend("batch_norm_masked", torch.randn(4, 3, 6)).module is composite


def test_small_rows_of_spatial_values_go_to_aten_for_training():
    """A training step over a small NCHW tensor costs less as ATen's differentiable op than as a
    Numba forward plus bnlab's backward, unless its rows are long (few channels, large images)."""
    from bnlab.kernels import cpu

    plain_from, fused_from = (
        cpu._NCS_FORWARD_FROM_NUMEL["batch_norm"],
        cpu._NCS_FORWARD_FROM_NUMEL["batch_norm_act"],
    )
    for numel, op, expected in (
        (plain_from // 2, "batch_norm", native),
        (plain_from, "batch_norm", cpu),
        (fused_from // 2, "batch_norm_act", native),
        (fused_from, "batch_norm_act", cpu),
    ):
        x = torch.empty(numel // (64 * 64), 64, 8, 8)  # rows of 64 values
        assert kernels.select_backend(op, x).module is expected, (op, tuple(x.shape))
    long_rows = torch.empty(4, 3, 64, 64)  # 48K values in rows of 4096
    assert kernels.select_backend("batch_norm", torch.empty(8, 3, 64, 64)).module is cpu
    assert kernels.select_backend("batch_norm_act", torch.empty(8, 3, 64, 64)).module is cpu
    assert (
        kernels.select_backend("batch_norm", long_rows).module is native
    )  # below 64K values: ATen


def test_many_channels_innermost_prefer_aten_unless_fused_and_large():
    """Plain BN over (N, C) or channels_last with many channels runs ATen's kernels; with a fused
    activation on a large (N, C) tensor, or when asked by name, bnlab's CPU kernels run it; a
    large channels_last image keeps ATen's (bnlab's lost inside models: cpu.prefers)."""
    from bnlab.kernels import cpu

    for x in (
        torch.randn(4096, 64),
        torch.randn(32, 64, 8, 8).to(memory_format=torch.channels_last),
    ):
        assert kernels.select_backend("batch_norm", x).module is native
        assert kernels.select_backend("batch_norm", x, "cpu").module is cpu
        assert kernels.select_backend("batch_norm_act", x).module is native
    wide_rows = torch.empty(4096, 1024)
    assert kernels.select_backend("batch_norm", wide_rows).module is native
    assert kernels.select_backend("batch_norm_act", wide_rows).module is cpu
    for shape in ((64, 64, 32, 32), (8, 256, 28, 28)):
        image = torch.empty(shape).to(memory_format=torch.channels_last)
        assert kernels.select_backend("batch_norm_act", image, activation="relu").module is native
        assert kernels.select_backend("batch_norm_act", image, "cpu", "relu").module is cpu
    assert (
        kernels.select_backend("batch_norm_act", torch.empty(1024, 4096)).module is native
    )  # too wide
    assert kernels.select_backend("batch_norm", torch.empty(512, 64, 8, 8)).module is cpu  # NCHW


def test_backward_over_rows_goes_to_aten_below_two_million_values():
    """The backward of rows of spatial values pays two parallel passes per call: ATen's wins on
    smaller tensors; channels_last images with few channels stay with bnlab's kernels from 1M."""
    from bnlab.kernels import cpu

    small, large = torch.empty(8, 1, 256, 256), torch.empty(16, 3, 224, 224)
    assert kernels.select_backend("batch_norm", small).module is cpu  # its forward is bnlab's
    assert kernels.select_backend("batch_norm_backward", small).module is native
    assert kernels.select_backend("batch_norm_backward", small, "cpu").module is cpu
    assert kernels.select_backend("batch_norm_backward", large).module is cpu
    few = torch.empty(128, 3, 64, 64).to(memory_format=torch.channels_last)
    assert kernels.select_backend("batch_norm_backward", few).module is cpu
    fewer = torch.empty(8, 16, 32, 32).to(memory_format=torch.channels_last)  # mobilenetv3's
    assert kernels.select_backend("batch_norm_backward", fewer).module is native
    assert kernels.select_backend("batch_norm", fewer).module is native
    assert kernels.select_backend("batch_norm_eval", fewer).module is native  # 16 channels


def _count_selections(monkeypatch) -> list:
    """Every op the registry is asked for, by functional or the ops' backward, in order."""
    asked = []
    select = kernels.select_backend

    def counting(op, x, requested=None, activation=None):
        asked.append(op)
        return select(op, x, requested, activation)

    monkeypatch.setattr(bnlab.functional, "select_backend", counting)
    monkeypatch.setattr(bnlab.ops, "select_backend", counting)
    return asked


def test_backward_selection_reaches_the_backward_op(float64_only_backend, monkeypatch):
    """A plain training backward asks the registry once more, for ``batch_norm_backward``."""
    asked = _count_selections(monkeypatch)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = bnlab.batch_norm(x, None, None, training=True)
    assert asked == ["batch_norm"]
    y.sum().backward()
    assert asked == ["batch_norm", "batch_norm_backward"]


@pytest.mark.parametrize("backend", [None, "composite", "native", "cpu"])
@pytest.mark.parametrize("shape", [(4, 3), (8, 3, 64, 64)], ids=str)
def test_backend_is_selected_once_per_call(monkeypatch, backend, shape):
    """Each functional call asks the registry once; each backward at most once more."""
    asked = _count_selections(monkeypatch)
    x = torch.randn(*shape, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    for training in (True, False):
        for call in (
            lambda: bnlab.functional.batch_norm(x, rm, rv, training=training, backend=backend),
            lambda: bnlab.functional.batch_norm_act(x, rm, rv, training=training, backend=backend),
        ):
            asked.clear()
            y = call()
            assert len(asked) == 1, asked
            y.sum().backward()
            assert len(asked) <= 2, asked
    asked.clear()
    bnlab.functional.layer_norm(x, shape[-1:], backend="composite" if backend else None)
    assert asked == ["layer_norm"]


def test_former_backend_names_still_select(float64_only_backend):
    """The names before the registry named backends after their modules: torch, numba, triton."""
    x = torch.randn(4, 3, 16, 16)
    assert kernels.select_backend("batch_norm", x, "torch").name == "composite"
    assert kernels.select_backend("batch_norm", x, "numba").name == "cpu"
    bnlab.batch_norm(x.double(), None, None, training=True, backend="torch")
    assert float64_only_backend == []  # the composite backend ran, not the automatic choice
    assert kernels.get_backend("torch") is kernels.get_backend("composite")


def test_backend_names_are_module_names():
    for name in kernels.available_backends():
        if name in ("composite", "native", "cpu", "gpu"):
            assert kernels.get_backend(name).module.__name__ == f"bnlab.kernels.{name}"


def test_eval_goes_to_aten_unless_few_channels_innermost():
    """Eval is one streaming pass ATen already does at copy speed, except over few channels
    innermost (channels_last images), where bnlab's joined rows win."""
    from bnlab.kernels import cpu

    assert kernels.select_backend("batch_norm_eval", torch.randn(32, 64, 8, 8)).module is native
    assert kernels.select_backend("batch_norm_eval", torch.randn(4096, 64)).module is native
    images = torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last)
    assert kernels.select_backend("batch_norm_eval", images).module is cpu
    assert kernels.select_backend("batch_norm_eval", torch.randn(32, 64, 8, 8), "cpu").module is cpu


def test_automatic_selection_prefers_priority_and_falls_back(float64_only_backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bnlab.batch_norm(x, None, None, training=True).sum().backward()
    assert float64_only_backend == ["forward", "backward"]
    bnlab.batch_norm(x.detach().float(), None, None, training=True)  # float32: falls back to torch
    assert float64_only_backend == ["forward", "backward"]
    assert kernels.available_backends()[0] == "f64only"


def test_named_backend_that_cannot_run_raises(float64_only_backend):
    with pytest.raises(
        RuntimeError, match="backend 'f64only' cannot run batch_norm on a torch.float32"
    ):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="f64only")


def test_environment_variable_selects(float64_only_backend, monkeypatch):
    monkeypatch.setenv("BNLAB_BACKEND", "composite")
    bnlab.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, training=True)
    assert float64_only_backend == []
    monkeypatch.setenv("BNLAB_BACKEND", "f64only")
    with pytest.raises(RuntimeError, match="cannot run"):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True)
    # the argument beats the environment
    bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="composite")


def test_unknown_backend_names_the_known_ones(monkeypatch):
    known = re.escape(str(bnlab.kernels.available_backends()))
    with pytest.raises(ValueError, match=rf"unknown bnlab backend 'nope'; expected one of {known}"):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="nope")
    monkeypatch.setenv("BNLAB_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown bnlab backend 'nope'"):
        bnlab.nn.LayerNorm(3)(torch.randn(4, 3))


def test_module_backend_argument_reaches_the_kernels(float64_only_backend):
    bn = bnlab.nn.BatchNorm1d(3, dtype=torch.float64, backend="composite")
    bn(torch.randn(4, 3, dtype=torch.float64))
    assert float64_only_backend == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_backward", "batch_norm_eval"])
def test_half_inputs_go_to_aten_mixed_precision_kernel(dtype, op):
    """Half CPU batch norm (autocast, or a .to(bfloat16) model) runs ATen's mixed-precision
    kernel, as torch.nn's does, not the composite backend (8-15x slower, benchmarks/
    model_speed.py)."""
    assert kernels.select_backend(op, torch.randn(2, 3, dtype=dtype)).name == "native"


@pytest.mark.parametrize(
    "activation", ["silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh", "elu"]
)
def test_activations_numba_runs_slower_than_aten_stay_with_aten(activation):
    """A large NCHW fused BN + activation goes to the Numba kernels only for the piecewise-linear
    activations (cpu.prefers has the measurements)."""
    x = torch.randn(32, 64, 32, 32)
    assert kernels.select_backend("batch_norm_act", x, activation="relu").name == "cpu"
    assert kernels.select_backend("batch_norm_act", x, activation=activation).name == "native"
    assert kernels.select_backend("batch_norm_act", x, "cpu", activation).name == "cpu"


@pytest.mark.parametrize(
    "shape, chosen",
    [((16, 3, 64, 64), "cpu"), ((16, 24, 32, 32), "native"), ((16, 16, 64, 64), "native")],
)
def test_channels_last_eval_goes_to_numba_only_where_aten_loops_are_short(shape, chosen):
    """Eval of a channels_last input with few channels: bnlab's kernels below 8 channels (or
    from 4M values), ATen's otherwise (cpu.prefers has the measurements)."""
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert kernels.select_backend("batch_norm_eval", x).name == chosen


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize(
    "shape, chosen",
    [
        ((128, 3, 64, 64), "cpu"),
        ((16, 7, 128, 128), "cpu"),
        ((16, 3, 8, 64, 64), "cpu"),
        ((16, 8, 128, 128), "native"),
        ((8, 16, 112, 112), "native"),  # mobilenetv3_large_100's at 224 px
        ((16, 16, 8, 32, 32), "native"),  # r3d_small's at 64 px
    ],
)
def test_channels_last_training_goes_to_numba_only_below_eight_channels(shape, chosen):
    """Training over a channels_last image (from 1M values): bnlab's kernels below 8 channels,
    where ATen's vector loop is partly empty; ATen's from 8, where bnlab's lost inside models
    (cpu.prefers has the measurements). Rows of as many channels keep their own rule."""
    x = torch.empty(shape).contiguous(memory_format=CHANNELS_LAST[len(shape)])
    for op in ("batch_norm", "batch_norm_act", "batch_norm_backward"):
        assert kernels.select_backend(op, x).name == chosen, op
    rows = torch.empty(x.numel() // shape[1], shape[1])
    rows_chosen = "native" if shape[1] == 16 else "cpu"  # see the test below
    assert kernels.select_backend("batch_norm", rows).name == rows_chosen


@pytest.mark.parametrize("channels, chosen", [(4, "cpu"), (8, "cpu"), (16, "native"), (24, "cpu")])
def test_training_over_rows_of_few_channels_leaves_sixteen_to_aten(channels, chosen):
    """(N, C) rows of fewer than 32 channels train on bnlab's kernels from 1M values and evaluate
    there from 4M (below 8 channels from 64K), except 16 channels, where ATen's loops are fast and
    a model trained and evaluated slower through bnlab's (cpu.prefers has the measurements)."""
    x = torch.empty(max(1 << 20, 70_000 * channels) // channels, channels)
    for op in ("batch_norm", "batch_norm_act", "batch_norm_backward"):
        assert kernels.select_backend(op, x).name == chosen, op
    large = torch.empty(-(-(1 << 22) // channels), channels)  # 4M values or just over
    assert kernels.select_backend("batch_norm_eval", large).name == chosen
    assert kernels.select_backend("batch_norm", x, "cpu").name == "cpu"  # named: it runs


@pytest.fixture
def cpu_backend_restored():
    """Puts the ``cpu`` backend back as registered after a test that withdraws it."""
    saved = kernels._BACKENDS.get("cpu")
    yield saved
    if saved is not None:
        kernels.register_backend(
            saved.name, saved.module, saved.supports, saved.priority, saved.prefers
        )
    assert kernels.withdrawn_backends() == {}


def test_a_fork_after_openmp_started_withdraws_the_cpu_backend(cpu_backend_restored, monkeypatch):
    if cpu_backend_restored is None:
        pytest.skip("Numba is not installed")
    from bnlab.kernels import cpu

    x = torch.randn(8, 64, 64, 64)  # 2M values: bnlab's kernels in training
    layer = bnlab.nn.BatchNorm2d(64)
    reference = torch.nn.BatchNorm2d(64)
    assert kernels.select_backend("batch_norm", x).name == "cpu"
    layer(x)  # a decision kept on the layer before the fork
    reference(x)
    monkeypatch.setattr(cpu, "openmp_pool_started", lambda: True)
    kernels._after_fork_in_child()
    assert "cpu" not in kernels.available_backends()
    assert kernels.withdrawn_backends() == {"cpu": cpu.FORKED_AFTER_OPENMP}
    assert kernels.select_backend("batch_norm", x).name == "native"
    for name in ("cpu", "numba"):  # by name, and by its former name
        with pytest.raises(RuntimeError, match=r"'cpu' cannot run: this process was forked"):
            kernels.select_backend("batch_norm", x, name)
    with pytest.raises(RuntimeError, match="'spawn' or 'forkserver'"):
        bnlab.nn.BatchNorm2d(64, backend="cpu")(x)
    y = layer(x)  # the kept decision is made again
    expected = reference(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == 2


def test_a_fork_before_openmp_started_keeps_the_cpu_backend(cpu_backend_restored, monkeypatch):
    if cpu_backend_restored is None:
        pytest.skip("Numba is not installed")
    from bnlab.kernels import cpu

    monkeypatch.setattr(cpu, "openmp_pool_started", lambda: False)
    kernels._after_fork_in_child()
    assert "cpu" in kernels.available_backends() and kernels.withdrawn_backends() == {}


FORKED_CHILD = """
import os, torch, bnlab
from bnlab import kernels
from bnlab.kernels import cpu
torch.manual_seed(0)
x = torch.randn(8, 64, 64, 64, requires_grad=True)
layer, reference = bnlab.nn.BatchNorm2d(64), torch.nn.BatchNorm2d(64)
layer(x).square().sum().backward()  # bnlab's kernels, both ways, in the parent
reference(x).square().sum().backward()
started = cpu.openmp_pool_started()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        torch.set_num_threads(1)  # as a DataLoader worker does
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        expected = reference(x)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        assert ("cpu" in kernels.available_backends()) != started
        print("child", kernels.select_backend("batch_norm", x).name, flush=True)
        code = 0
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print("parent", os.waitstatus_to_exitcode(status), kernels.select_backend("batch_norm", x).name)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX's")
def test_a_child_forked_after_the_kernels_ran_trains_instead_of_being_terminated():
    result = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert "parent 0 cpu" in lines, result.stdout + result.stderr  # the child exited 0
    assert any(line in ("child native", "child cpu") for line in lines), result.stdout
    assert "Terminating" not in result.stderr
