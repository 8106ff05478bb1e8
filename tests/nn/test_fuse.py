"""bnlab.convert(model, fuse_activations=True): batch norm + the activation module after it."""

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.nn import BatchNormAct2d, FusedActivation


class Block(nn.Module):
    """conv -> bn -> (identity) -> act, and a second bn whose output feeds a residual sum."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Identity()
        self.act = act
        self.bn_res = nn.BatchNorm2d(4)
        self.act_res = nn.ReLU()

    def forward(self, x):
        y = self.act(self.drop(self.bn(self.conv(x))))
        return self.act_res(self.bn_res(y) + y)


def train_steps(model, x, steps=2):
    """Outputs and input gradients of ``steps`` SGD training steps, then the state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = []
    for _ in range(steps):
        xi = x.clone().requires_grad_()
        y = model(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        opt.step(), opt.zero_grad()
        outs += [y.detach(), xi.grad]
    return outs, model.state_dict()


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.LeakyReLU(0.2)], ids=repr)
def test_fused_model_trains_as_the_original(act):
    torch.manual_seed(0)
    original = Block(act).double()
    model, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    assert report.fused == ["bn -> act"]  # bn_res feeds the sum too: left
    assert isinstance(model.bn, BatchNormAct2d) and isinstance(model.act, FusedActivation)
    assert model.bn.activation == ("relu" if isinstance(act, nn.ReLU) else "leaky_relu")
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    (outs, state), (want, want_state) = train_steps(model, x), train_steps(original, x)
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for key in want_state:
        torch.testing.assert_close(state[key], want_state[key], rtol=1e-12, atol=1e-12)
    back = bnlab.revert(model)
    assert type(back.bn) is nn.BatchNorm2d and type(back.bn_res) is nn.BatchNorm2d
    assert type(back.act) is type(act) and repr(back.act) == repr(act)
    assert not {"activation", "activation_param"} & vars(back.bn).keys()


def test_shared_or_hooked_activations_are_not_fused():
    shared = nn.ReLU()  # torchvision's ResNet calls one self.relu after several layers
    model = nn.Sequential(nn.BatchNorm2d(3), shared, nn.BatchNorm2d(3), shared)
    assert bnlab.convert(model, report=True, fuse_activations=True)[1].fused == []
    hooked = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    hooked[1].register_forward_hook(lambda module, args, out: None)
    assert bnlab.convert(hooked, report=True, fuse_activations=True)[1].fused == []
    silu = nn.Sequential(nn.BatchNorm2d(3), nn.SiLU())  # not run faster fused: left
    assert bnlab.convert(silu, report=True, fuse_activations=True)[1].fused == []


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(3), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = -x
        return self.act(self.bn(x))


def test_untraceable_model_is_converted_unfused_and_says_why():
    with pytest.warns(bnlab.ConversionWarning, match="fused no activation: torch.fx cannot trace"):
        model, report = bnlab.convert(DataDependent(), report=True, fuse_activations=True)
    assert isinstance(model.bn, bnlab.nn.BatchNorm2d) and isinstance(model.act, nn.ReLU)
    assert report.fused == [] and "torch.fx cannot trace" in str(report)


def test_without_the_option_nothing_is_fused():
    model, report = bnlab.convert(Block(nn.ReLU()), report=True)
    assert type(model.bn) is bnlab.nn.BatchNorm2d and report.fused == []


class ConvNet(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> pool, and a bn after a sum (not in place)."""

    def __init__(self, pool=nn.MaxPool2d) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.conv2, self.bn2, self.pool = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), pool(2)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        return self.bn3(self.pool(self.bn2(self.conv2(y))) + self.pool(y))


def test_inplace_abn_keeps_only_outputs_and_says_it_changes_the_function():
    torch.manual_seed(0)
    original = ConvNet().double()
    with pytest.warns(bnlab.ConversionWarning, match=r"in-place activated .* leaky_relu"):
        model, report = bnlab.convert(copy.deepcopy(original), report=True, inplace_abn=True)
    assert report.inplace_abn == ["bn1 -> act1", "bn2"]  # bn3 reads a sum: left as it was
    # max pooling keeps bn2's output for its backward; average pooling keeps nothing: in place
    # would change bn2's function and save no memory
    with pytest.warns(bnlab.ConversionWarning, match="in-place activated"):
        averaged = bnlab.convert(ConvNet(nn.AvgPool2d), report=True, inplace_abn=True)[1]
    assert averaged.inplace_abn == ["bn1 -> act1"]
    assert model.bn1.inplace and model.bn1.activation == "leaky_relu"
    assert model.bn1.activation_param == 0.01 and model.bn2.activation == "identity"
    assert type(model.bn3) is bnlab.nn.BatchNorm2d
    assert model.state_dict().keys() == original.state_dict().keys()
    # the function the paper trains: |gamma| + eps, and leaky_relu(0.01) for the ReLU
    expected = copy.deepcopy(original)
    expected.act1 = nn.LeakyReLU(0.01)
    with torch.no_grad():
        for bn in (expected.bn1, expected.bn2):
            bn.weight.copy_(bn.weight.abs() + bn.eps)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    (outs, state), (want, want_state) = train_steps(model, x, 1), train_steps(expected, x, 1)
    for got, wanted in zip(outs, want):
        torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-10)
    for key in ("bn1.running_mean", "bn1.running_var", "bn2.running_var", "bn3.running_var"):
        torch.testing.assert_close(state[key], want_state[key], rtol=1e-12, atol=1e-12)
    back = bnlab.revert(model)
    assert type(back.bn1) is nn.BatchNorm2d and type(back.act1) is nn.ReLU
    assert not {"inplace", "activation"} & vars(back.bn1).keys()


class AddsInPlace(nn.Module):
    """timm's Bottleneck ends with ``x = bn3(conv3(x)); x += shortcut``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        y += x
        return self.act2(self.bn2(self.conv2(y))) * 2  # not a layer: it might write over its input


def test_inplace_abn_leaves_outputs_something_writes_over():
    model, report = bnlab.convert(AddsInPlace(), report=True, inplace_abn=True)
    assert report.inplace_abn == []
    model(torch.randn(2, 3, 4, 4)).sum().backward()  # and it trains
