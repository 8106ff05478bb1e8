"""bnlab.nn.BatchNormAct* and InPlaceABN*: drop-in for BatchNorm + activation, checkpoints
included."""

import pytest
import torch

import bnlab
from bnlab.nn import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    InPlaceABN1d,
    InPlaceABN2d,
    InPlaceABN3d,
)
from tolerances import FORWARD, GRADIENT, assert_close


class ExactHardsigmoid(torch.nn.Module):
    """torch.nn.Hardsigmoid with the exact gradient 1/6 inside (-3, 3): torch's float64 backward
    multiplies by 1/6 rounded to float32 (3e-8 relative), outside the float64 tolerance."""

    def forward(self, z):
        return torch.where(z <= -3, 0.0, torch.where(z >= 3, 1.0, (z + 3) / 6))


def torch_block(c, activation, slope=0.01):
    act = {
        "relu": torch.nn.ReLU(),
        "leaky_relu": torch.nn.LeakyReLU(slope),
        "silu": torch.nn.SiLU(),
        "hardswish": torch.nn.Hardswish(),
        "hardsigmoid": ExactHardsigmoid(),
        "gelu": torch.nn.GELU(),
        "gelu_tanh": torch.nn.GELU(approximate="tanh"),
    }[activation]
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), bn, act)


@pytest.mark.parametrize(
    "cls,activation",
    [
        (BatchNormAct2d, "relu"),
        (InPlaceABN2d, "leaky_relu"),
        *[(BatchNormAct2d, a) for a in ("silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh")],
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_block_trains_like_torch(cls, activation, channels_last):
    """conv -> BN -> act for three steps: loss, parameter gradients and running statistics agree
    (gamma starts positive; torch.nn's gets the in-place mode's + eps)."""
    torch.manual_seed(0)
    theirs = torch_block(4, activation)
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), cls(4, activation=activation))
    ours.load_state_dict(theirs.state_dict())  # BatchNorm2d's keys load unchanged
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # float64: this checks the modules' wiring; the fused kernels' float32 accuracy is bounded
    # against the float64 truth in tests/test_functional_act.py
    ours.to(torch.float64, memory_format=fmt), theirs.to(torch.float64, memory_format=fmt)
    if cls is InPlaceABN2d:  # which normalizes with |gamma| + eps
        with torch.no_grad():
            theirs[1].weight.add_(ours[1].eps)
    for step in range(3):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt)
        losses = [(m(x) ** 2).mean() for m in (ours, theirs)]
        for loss in losses:
            loss.backward()
        assert_close(losses[0], losses[1], torch.float64, FORWARD)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, torch.float64, GRADIENT, msg=name)
            p.grad = q.grad = None
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
        if c.is_floating_point():
            assert_close(b, c, c.dtype, FORWARD, msg=name)
        else:
            assert torch.equal(b, c), name


def test_eval_uses_running_statistics():
    m = BatchNormAct1d(3, activation="leaky_relu", activation_param=0.2)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        m.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    m.eval()
    x = torch.randn(5, 3)
    expected = torch.nn.functional.leaky_relu(
        (x - m.running_mean) / torch.sqrt(m.running_var + m.eps), 0.2
    )
    torch.testing.assert_close(m(x), expected)


def test_inplace_module_overwrites_its_input_and_defaults_to_leaky_relu():
    m = InPlaceABN3d(2)
    assert (m.activation, m.activation_param) == ("leaky_relu", 0.01)
    x = torch.randn(2, 2, 3, 3, 3)
    y = m(x)
    assert y is x
    assert BatchNormAct2d(2).activation == "relu"


@pytest.mark.parametrize(
    "cls,rank",
    [
        (BatchNormAct1d, 4),
        (BatchNormAct2d, 3),
        (BatchNormAct3d, 4),
        (InPlaceABN1d, 4),
        (InPlaceABN2d, 5),
    ],
)
def test_wrong_rank_is_an_error(cls, rank):
    with pytest.raises(ValueError, match=f"got {rank}D input"):
        cls(3)(torch.randn(*([2, 3] + [2] * (rank - 2))))


@pytest.mark.parametrize(
    "activation", ["relu", "silu", "hardswish", "hardsigmoid", "gelu", "gelu_tanh"]
)
def test_inplace_refuses_what_it_cannot_invert_and_names_what_it_can(activation):
    with pytest.raises(ValueError, match=rf"'{activation}' is not invertible") as error:
        InPlaceABN2d(3, activation=activation)
    assert "('identity', 'leaky_relu', 'elu')" in str(error.value)
    assert BatchNormAct2d(3, activation=activation).activation == activation  # fused: fine


def test_bad_activation_is_an_error_at_construction():
    with pytest.raises(ValueError, match="unknown activation"):
        BatchNormAct2d(3, activation="swish")
    with pytest.raises(ValueError, match="'silu' takes no parameter"):
        BatchNormAct2d(3, activation="silu", activation_param=1.0)


def test_repr_and_state_dict_keys():
    m = InPlaceABN2d(3, activation="elu", activation_param=0.5)
    assert repr(m) == (
        "InPlaceABN2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, "
        "track_running_stats=True, activation='elu', activation_param=0.5)"
    )
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert "activation='relu'" in repr(bnlab.nn.BatchNormAct1d(4))
