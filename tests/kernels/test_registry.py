"""The backend registry: argument > BNLAB_BACKEND > automatic; named backends that cannot run raise."""

import re
import types

import pytest
import torch

import bnlab
from bnlab import kernels
from bnlab.kernels import native, torch_ops


@pytest.fixture
def float64_only_backend():
    """A registered backend that wraps the composite one, runs float64 only, and counts its calls."""
    calls = []

    def forward(*args):
        calls.append("forward")
        return torch_ops.batch_norm_forward(*args)

    def backward(*args):
        calls.append("backward")
        return torch_ops.batch_norm_backward(*args)

    module = types.SimpleNamespace(batch_norm_forward=forward, batch_norm_backward=backward)
    kernels.register_backend("f64only", module, lambda op, x: op in ("batch_norm", "batch_norm_backward") and x.dtype == torch.float64,
                             priority=100)
    yield calls
    kernels.unregister_backend("f64only")
    assert "f64only" not in kernels.available_backends()


def test_torch_backend_is_always_there():
    assert "torch" in kernels.available_backends()
    for dtype in (torch.bfloat16, torch.float16):
        assert kernels.select_backend("batch_norm", torch.randn(2, 3, dtype=dtype)) is torch_ops
    assert kernels.select_backend("batch_norm_masked", torch.randn(2, 3)) is torch_ops
    assert kernels.select_backend("layer_norm", torch.randn(2, 3)) is torch_ops


def test_numba_backend_is_preferred_for_what_it_runs():
    from bnlab.kernels import cpu

    for x in (torch.randn(2 ** 16, 3), torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last),
              torch.empty(64, 8, 1024, dtype=torch.float64)):
        assert kernels.select_backend("batch_norm", x) is cpu
        assert kernels.select_backend("batch_norm_act", x) is cpu
    tiny = torch.randn(2, 3, 4)  # the per-call cost decides: ATen's kernels, unless named
    assert kernels.select_backend("batch_norm", tiny) is native
    assert kernels.select_backend("batch_norm_act", tiny) is native
    assert kernels.select_backend("batch_norm", tiny, "numba") is cpu
    assert kernels.select_backend("batch_norm_act", tiny, "numba") is cpu
    # strided views and empty tensors: ATen's kernels; masked statistics: the composite backend
    for x in (torch.randn(3, 2).t(), torch.randn(4, 3, 6)[:, :, ::2]):
        assert kernels.select_backend("batch_norm", x) is native
    assert kernels.select_backend("batch_norm", torch.randn(0, 3)) is torch_ops
    assert kernels.select_backend("batch_norm_masked", torch.randn(4, 3, 6)) is torch_ops


def test_small_rows_of_spatial_values_go_to_aten_for_training():
    """A training step over a small NCHW tensor costs less as ATen's differentiable op than as a
    Numba forward plus bnlab's backward, unless its rows are long (few channels, large images)."""
    from bnlab.kernels import cpu

    plain_from, fused_from = cpu._NCS_FORWARD_FROM_NUMEL["batch_norm"], cpu._NCS_FORWARD_FROM_NUMEL["batch_norm_act"]
    for numel, op, expected in ((plain_from // 2, "batch_norm", native), (plain_from, "batch_norm", cpu),
                                (fused_from // 2, "batch_norm_act", native),
                                (fused_from, "batch_norm_act", cpu)):
        x = torch.empty(numel // (64 * 64), 64, 8, 8)  # rows of 64 values
        assert kernels.select_backend(op, x) is expected, (op, tuple(x.shape))
    long_rows = torch.empty(4, 3, 64, 64)  # 48K values in rows of 4096
    assert kernels.select_backend("batch_norm", torch.empty(8, 3, 64, 64)) is cpu
    assert kernels.select_backend("batch_norm_act", torch.empty(8, 3, 64, 64)) is cpu
    assert kernels.select_backend("batch_norm", long_rows) is native  # below 64K values: ATen


def test_many_channels_innermost_prefer_aten_unless_fused_and_large():
    """Plain BN over (N, C) or channels_last with many channels runs ATen's kernels; with a fused
    activation on a large tensor, or when asked by name, bnlab's CPU kernels run it."""
    from bnlab.kernels import cpu

    for x in (torch.randn(4096, 64), torch.randn(32, 64, 8, 8).to(memory_format=torch.channels_last)):
        assert kernels.select_backend("batch_norm", x) is native
        assert kernels.select_backend("batch_norm", x, "numba") is cpu
        assert kernels.select_backend("batch_norm_act", x) is native
    for x in (torch.empty(4096, 1024), torch.empty(64, 64, 32, 32).to(memory_format=torch.channels_last)):
        assert kernels.select_backend("batch_norm", x) is native
        assert kernels.select_backend("batch_norm_act", x) is cpu
    assert kernels.select_backend("batch_norm_act", torch.empty(1024, 4096)) is native  # too wide
    assert kernels.select_backend("batch_norm", torch.empty(128, 64, 8, 8)) is cpu  # NCHW


def test_backward_over_rows_goes_to_aten_below_two_million_values():
    """The backward of rows of spatial values pays two parallel passes per call: ATen's wins on
    smaller tensors; channels_last images with few channels stay with bnlab's kernels."""
    from bnlab.kernels import cpu

    small, large = torch.empty(8, 1, 256, 256), torch.empty(16, 3, 224, 224)
    assert kernels.select_backend("batch_norm", small) is cpu  # its forward is bnlab's
    assert kernels.select_backend("batch_norm_backward", small) is native
    assert kernels.select_backend("batch_norm_backward", small, "numba") is cpu
    assert kernels.select_backend("batch_norm_backward", large) is cpu
    few = torch.empty(8, 3, 64, 64).to(memory_format=torch.channels_last)
    assert kernels.select_backend("batch_norm_backward", few) is cpu


def test_backward_selection_reaches_the_backward_op(float64_only_backend, monkeypatch):
    """A plain training backward asks the registry for ``batch_norm_backward``."""
    asked = []
    select = kernels.select_backend
    monkeypatch.setattr(bnlab.functional, "select_backend",
                        lambda op, x, requested=None: asked.append(op) or select(op, x, requested))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bnlab.batch_norm(x, None, None, training=True).sum().backward()
    assert set(asked[:-1]) == {"batch_norm"} and asked[-1] == "batch_norm_backward"


def test_eval_goes_to_aten_unless_few_channels_innermost():
    """Eval is one streaming pass ATen already does at copy speed, except over few channels
    innermost (channels_last images), where bnlab's joined rows win."""
    from bnlab.kernels import cpu

    assert kernels.select_backend("batch_norm_eval", torch.randn(32, 64, 8, 8)) is native
    assert kernels.select_backend("batch_norm_eval", torch.randn(4096, 64)) is native
    images = torch.randn(64, 3, 32, 32).to(memory_format=torch.channels_last)
    assert kernels.select_backend("batch_norm_eval", images) is cpu
    assert kernels.select_backend("batch_norm_eval", torch.randn(32, 64, 8, 8), "numba") is cpu


def test_automatic_selection_prefers_priority_and_falls_back(float64_only_backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bnlab.batch_norm(x, None, None, training=True).sum().backward()
    assert float64_only_backend == ["forward", "backward"]
    bnlab.batch_norm(x.detach().float(), None, None, training=True)  # float32: falls back to torch
    assert float64_only_backend == ["forward", "backward"]
    assert kernels.available_backends()[0] == "f64only"


def test_named_backend_that_cannot_run_raises(float64_only_backend):
    with pytest.raises(RuntimeError, match="backend 'f64only' cannot run batch_norm on a torch.float32"):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="f64only")


def test_environment_variable_selects(float64_only_backend, monkeypatch):
    monkeypatch.setenv("BNLAB_BACKEND", "torch")
    bnlab.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, training=True)
    assert float64_only_backend == []
    monkeypatch.setenv("BNLAB_BACKEND", "f64only")
    with pytest.raises(RuntimeError, match="cannot run"):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True)
    # the argument beats the environment
    bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="torch")


def test_unknown_backend_names_the_known_ones(monkeypatch):
    known = re.escape(str(bnlab.kernels.available_backends()))
    with pytest.raises(ValueError, match=rf"unknown bnlab backend 'nope'; expected one of {known}"):
        bnlab.batch_norm(torch.randn(4, 3), None, None, training=True, backend="nope")
    monkeypatch.setenv("BNLAB_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown bnlab backend 'nope'"):
        bnlab.nn.LayerNorm(3)(torch.randn(4, 3))


def test_module_backend_argument_reaches_the_kernels(float64_only_backend):
    bn = bnlab.nn.BatchNorm1d(3, dtype=torch.float64, backend="torch")
    bn(torch.randn(4, 3, dtype=torch.float64))
    assert float64_only_backend == []
