"""set_statistics: which statistics normalize, as module state that survives .train()/.eval(),
each mode against its definition, and nothing updating the running statistics."""

import copy

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn as bn

KINDS = ["bn1d", "bn2d", "bn3d", "act", "iabn", "ghost", "renorm", "sync"]


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "bn1d": lambda: bn.BatchNorm1d(3),
        "bn2d": lambda: bn.BatchNorm2d(3),
        "bn3d": lambda: bn.BatchNorm3d(3),
        "act": lambda: bn.BatchNormAct2d(3, activation="elu"),
        "iabn": lambda: bn.InPlaceABN2d(3),
        "ghost": lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2),
        "renorm": lambda: bn.BatchRenorm2d(3),
        "sync": lambda: bn.SyncBatchNorm(3),
    }[kind]().double()
    with torch.no_grad():  # non-trivial state
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def example(kind: str) -> torch.Tensor:
    shape = {"bn1d": (8, 3), "bn3d": (8, 3, 2, 2, 3)}.get(kind, (8, 3, 4, 4))
    return torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.7


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x.clone())  # the in-place layers overwrite their input


def buffers(layer: nn.Module) -> dict:
    return {k: v.clone() for k, v in layer.named_buffers()}


def activation_of(kind: str):
    return {"act": nn.functional.elu, "iabn": lambda z: nn.functional.leaky_relu(z, 0.01)}.get(
        kind, lambda z: z
    )


def by_definition(layer, x, mean, var, kind) -> torch.Tensor:
    """gamma (x - mean) / sqrt(var + eps) + beta, then the activation (float64)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    gamma = layer.weight.abs() + layer.eps if kind == "iabn" else layer.weight
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * gamma.view(shape)
    return activation_of(kind)(y + layer.bias.view(shape))


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, correction=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_running_mode_is_the_eval_output_and_updates_nothing(kind, training):
    layer, x = make(kind), example(kind)
    expected = run(copy.deepcopy(layer).eval(), x)
    before = buffers(layer)
    bnlab.nn.set_statistics(layer, "running")
    layer.train(training)
    torch.testing.assert_close(run(layer, x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buffers(layer), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "sync"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_mode_normalizes_with_the_batch_and_updates_nothing(kind, training):
    layer, x = make(kind), example(kind)
    before = buffers(layer)
    bnlab.nn.set_statistics(layer, "batch")
    layer.train(training)
    mean, var = batch_moments(x)
    expected = by_definition(layer, x, mean, var, kind)
    torch.testing.assert_close(run(layer, x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(buffers(layer), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "sync"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mix_mode_blends_running_and_batch_statistics(kind, alpha):
    layer, x = make(kind), example(kind)
    before = buffers(layer)
    mean_b, var_b = batch_moments(x)
    mean = (1 - alpha) * layer.running_mean + alpha * mean_b
    var = (1 - alpha) * layer.running_var + alpha * var_b
    expected = by_definition(layer, x, mean, var, kind)
    bnlab.nn.set_statistics(layer, "mix", alpha=alpha)
    for training in (True, False):
        layer.train(training)
        torch.testing.assert_close(run(layer, x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(buffers(layer), before, rtol=0, atol=0)


def test_mix_mode_is_differentiable_through_the_batch_statistics():
    layer, x = make("bn2d"), example("bn2d").requires_grad_()
    bnlab.nn.set_statistics(layer, "mix", alpha=0.4)

    def reference(t):
        mean_b, var_b = batch_moments(t)
        mean = 0.6 * layer.running_mean + 0.4 * mean_b
        var = 0.6 * layer.running_var + 0.4 * var_b
        return by_definition(layer, t, mean, var, "bn2d")

    torch.autograd.gradcheck(lambda t: layer(t), (x[:3, :, :2, :2].detach().requires_grad_(),))
    g = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight])
    r = torch.autograd.grad(reference(x).square().sum(), [x, layer.weight])
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_running_mode_trains_the_affine_parameters_only():
    layer, x = make("bn2d"), example("bn2d")
    bnlab.nn.set_statistics(layer, "running")
    layer.train()
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert int(layer.num_batches_tracked) == 0


def test_the_mode_survives_train_and_eval_and_stays_out_of_the_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    keys = list(model.state_dict())
    bnlab.convert(model)
    assert bnlab.nn.set_statistics(model, "running") == 1
    model.train()
    model.eval()
    model.train()
    assert model[1].statistics == "running"
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert clone[1].statistics == "running"
    assert bnlab.nn.set_statistics(model, "standard") == 1
    x = torch.randn(4, 3, 2, 2)
    model(x)
    assert int(model[1].num_batches_tracked) == 1


def test_torch_nn_layers_are_named_not_skipped():
    model = nn.Sequential(bn.BatchNorm2d(3), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"1 layer.*1 \(BatchNorm2d\).*bnlab.convert"):
        bnlab.nn.set_statistics(model, "batch")
    assert model[0].statistics == "standard"  # nothing set when anything is refused


@pytest.mark.parametrize(
    "mode, alpha, match",
    [
        ("runing", None, "unknown statistics mode 'runing'"),
        ("mix", None, r"alpha in \[0, 1\]"),
        ("mix", 1.5, r"alpha in \[0, 1\]"),
        ("batch", 0.5, "alpha is for statistics='mix' only"),
    ],
)
def test_bad_modes_are_refused(mode, alpha, match):
    with pytest.raises(ValueError, match=match):
        bnlab.nn.set_statistics(bn.BatchNorm1d(3), mode, alpha)


def test_a_mistyped_attribute_raises_at_the_forward():
    layer = bn.BatchNorm1d(3)
    layer.statistics = "runing"
    with pytest.raises(ValueError, match="unknown statistics mode 'runing'"):
        layer(torch.randn(4, 3))


def test_running_mode_without_running_statistics_says_so():
    layer = bn.BatchNorm1d(3, track_running_stats=False)
    bnlab.nn.set_statistics(layer, "running")
    with pytest.raises(ValueError, match="no running statistics"):
        layer(torch.randn(4, 3))


def test_sync_batch_norm_refuses_batch_statistics_it_would_not_synchronize():
    layer = make("sync")
    bnlab.nn.set_statistics(layer, "batch")
    with pytest.raises(NotImplementedError, match="only 'standard' and 'running'"):
        layer(example("sync"))
