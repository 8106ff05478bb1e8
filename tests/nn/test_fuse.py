"""bnlab.convert(model, fuse_activations=True): batch norm + the activation module after it."""

import copy
import io

import pytest
import torch
from torch import nn

import bnlab
from bnlab.nn import BatchNormAct2d, FusedActivation
from bnlab.nn.fuse import ResidualForward, residual_unit
from torchvision_standin import import_timm


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


def assert_trains_as(model, original, x):
    """Two training steps of model give original's outputs, input gradients and state (1e-12)."""
    (outs, state), (want, want_state) = train_steps(model, x), train_steps(original, x)
    for got, expected in zip(outs, want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for key in want_state:
        torch.testing.assert_close(state[key], want_state[key], rtol=1e-12, atol=1e-12)


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
    assert_trains_as(model, original, x)
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


# ------------------------------------------------------------------ residual units in a forward


class ResBlock(nn.Module):
    """A ResNet bottleneck as timm and torchvision write it: ``x = bn3(conv3(x)); x += shortcut;
    x = act3(x)``, the shortcut a strided conv + bn where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, act=nn.ReLU) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), act()
        self.conv3 = nn.Conv2d(cout, cout, 3, stride, padding=1)
        self.bn3, self.act3 = nn.BatchNorm2d(cout), act(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class SharedReluBlock(ResBlock):
    """torchvision's layout: one ``relu`` module called after bn1 and after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1, act=nn.ReLU) -> None:
        super().__init__(cin, cout, stride, act)
        self.act3 = self.act1


def res_net(act=nn.ReLU, block=ResBlock) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        block(4, 4, act=act),
        block(4, 6, 2, act=act),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@pytest.mark.parametrize("block", [ResBlock, SharedReluBlock])
@pytest.mark.parametrize("act", [nn.ReLU, lambda inplace=False: nn.LeakyReLU(0.2, inplace)])
def test_residual_units_fused_train_as_the_original(act, block):
    torch.manual_seed(0)
    original = res_net(act, block).double()
    model, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    act3 = "act1" if block is SharedReluBlock else "act3"  # fx names a shared module's first place
    assert report.residual == [f"1.bn3 + add -> 1.{act3}", f"2.bn3 + add -> 2.{act3}"]
    assert "fused 2 residual addition(s)" in str(report) and "bnlab.revert" in str(report)
    for block in (model[1], model[2]):
        assert isinstance(vars(block)["forward"], ResidualForward)
        assert type(block) is type(original[1]) and type(block.act3) is type(original[1].act3)
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert_trains_as(model, original, x)
    model.eval(), original.eval()
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    back = bnlab.revert(model)
    assert "forward" not in vars(back[1]) and "forward" not in vars(back[2])
    assert type(back[1].bn3) is nn.BatchNorm2d


def test_fused_blocks_copy_pickle_and_fuse_once():
    torch.manual_seed(0)
    model = bnlab.convert(res_net(), fuse_activations=True).eval()
    x = torch.randn(2, 3, 6, 6)
    twin = copy.deepcopy(model)
    assert vars(twin[1])["forward"].block is twin[1]  # the copy's own block, not the original's
    with torch.no_grad():
        twin[1].bn3.bias.add_(1.0)
    assert not torch.equal(twin(x), model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    again, report = bnlab.convert(model, report=True, fuse_activations=True)
    assert report.residual == [] and torch.equal(again(x), loaded(x))


def test_hooks_added_after_fusing_still_run():
    torch.manual_seed(0)
    model = bnlab.convert(res_net(), fuse_activations=True)
    seen = []
    model[1].bn3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = model(torch.randn(2, 3, 6, 6))
    assert seen == [(2, 4, 6, 6)] and y.shape == (2, 6)


class ModeBranch(ResBlock):
    """A block whose forward branches on the mode: its traced graph would fix one branch."""

    def forward(self, x):
        shortcut = x if self.training else x * 0.5
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


def assert_left_as_written(block: nn.Module, change=lambda model: None) -> None:
    """Fusing leaves ``block``'s forward, and (after ``change``) computes what it computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), block)
    fused, report = bnlab.convert(copy.deepcopy(model), report=True, fuse_activations=True)
    assert report.residual == [] and "forward" not in vars(fused[1])
    change(fused), change(model)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), bnlab.convert(model)(x), rtol=0, atol=0)


def test_blocks_whose_forward_depends_on_the_mode_are_left():
    assert_left_as_written(ModeBranch(4, 4))


class WritesOverOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 4, 1), ResBlock(4, 4)

    def forward(self, x):
        y = self.block(self.stem(x))
        y += 1.0  # written over: the in-place mode keeps the block's output for its backward
        return y


def test_inplace_residual_units_keep_output_and_shortcut_and_change_the_function():
    torch.manual_seed(0)
    original = res_net().double()
    with pytest.warns(bnlab.ConversionWarning, match="in-place activated"):
        model, report = bnlab.convert(copy.deepcopy(original), report=True, inplace_abn=True)
    assert report.residual == ["1.bn3 + add -> 1.act3", "2.bn3 + add -> 2.act3"]
    assert set(report.residual) <= set(report.inplace_abn)
    expected = copy.deepcopy(original)
    for block in (expected[1], expected[2]):
        block.act1, block.act3 = nn.LeakyReLU(0.01), nn.LeakyReLU(0.01, inplace=True)
        with torch.no_grad():
            for bn in (block.bn1, block.bn3):
                bn.weight.copy_(bn.weight.abs() + bn.eps)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    (outs, state), (want, want_state) = train_steps(model, x), train_steps(expected, x)
    for got, wanted in zip(outs, want):
        torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-10)
    for key in [k for k in want_state if "running" in k]:  # the weights differ by |w| + eps
        torch.testing.assert_close(state[key], want_state[key], rtol=1e-10, atol=1e-10)
    # a hook added later cannot run inside the in-place unit: said, by name
    model[1].bn3.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(RuntimeError, match="in-place residual unit .* with hooks"):
        model(x)
    with pytest.warns(bnlab.ConversionWarning):
        _, written = bnlab.convert(WritesOverOutput(), report=True, inplace_abn=True)
    assert written.residual == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnets_fuse_every_residual_unit(name):
    timm = import_timm()
    torch.manual_seed(0)
    original = timm.create_model(name, num_classes=10)
    model, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    last = "bn2" if name == "resnet18" else "bn3"
    act = "act2" if name == "resnet18" else "act3"
    assert len(report.residual) == len(blocks) == (8 if name == "resnet18" else 16)
    assert report.residual[0] == f"layer1.0.{last} + add -> layer1.0.{act}"
    x = torch.randn(2, 3, 32, 32)
    reference = bnlab.convert(copy.deepcopy(original))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


class DefaultShortcut(ResBlock):
    """DLA's layout: ``forward(x, shortcut=None)``, the shortcut x unless given. Traced alone the
    default is a placeholder, and the ``is None`` branch would be lost."""

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


def test_blocks_whose_forward_takes_defaults_are_left():
    assert_left_as_written(DefaultShortcut(4, 4))


class Scaled(nn.Module):
    """A module of the model's own, with a setting its forward reads at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


class ScaledShortcut(ResBlock):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout)
        self.scale = Scaled()

    def forward(self, x):
        shortcut = self.scale(x)
        x = self.bn3(self.conv3(x))
        x += shortcut
        return self.act3(x)


def test_blocks_that_trace_into_modules_of_their_own_are_left():
    """A traced graph would fix ``factor`` at its value when fusing."""
    assert_left_as_written(
        ScaledShortcut(4, 4), lambda model: setattr(model[1].scale, "factor", 3.0)
    )


def test_a_shortcut_of_another_dtype_adds_as_the_block_did():
    """``x += shortcut`` with a float64 shortcut into a float32 batch norm's output: the fused
    model runs the three steps and gives what the block gives (a float32 sum)."""
    torch.manual_seed(0)
    model = bnlab.convert(res_net(), fuse_activations=True)
    block = model[1]
    x = torch.randn(2, 4, 5, 5)
    shortcut = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = block.act3(block.bn3(x).add_(shortcut))
    got = residual_unit(block.bn3, x, shortcut, block.act3, False)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    wide = residual_unit(block.bn3, x, shortcut[:, :1], block.act3, False)  # broadcast: in place
    assert wide.shape == x.shape
    with pytest.raises(RuntimeError, match="a torch.float64 shortcut"):
        residual_unit(block.bn3, x, shortcut, block.act3, True)


def test_fused_models_trace_with_torch_fx_as_their_own_code():
    """Feature extraction and quantization trace models with torch.fx: a fused block traces as
    its own forward (same function); an in-place one, whose function differs, says so."""

    class Tracer(torch.fx.Tracer):  # as such tools do: the normalization layers stay whole
        def is_leaf_module(self, m, name):
            return isinstance(m, bnlab.nn.BatchNorm) or super().is_leaf_module(m, name)

    torch.manual_seed(0)
    model = bnlab.convert(res_net(), fuse_activations=True).eval()
    traced = torch.fx.GraphModule(model, Tracer().trace(model))
    assert "bn3" in traced.code and "residual_unit" not in traced.code
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)
    with pytest.warns(bnlab.ConversionWarning):
        inplace = bnlab.convert(res_net(), inplace_abn=True)
    with pytest.raises(RuntimeError, match="run in place"):
        Tracer().trace(inplace)


# --------------------------------------------------------------------------------------------
# dense layers: bn(torch.cat(features, 1)) -> bnlab.nn.fuse.concat_unit
# --------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer layout: a tensor or a list of features in, cat -> bn -> relu."""

    def __init__(self, channels: int, growth: int = 2) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, 4, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, growth, 3, padding=1, bias=False)

    def forward(self, input):
        features = [input] if isinstance(input, torch.Tensor) else input
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, channels: int = 3, layers: int = 4, growth: int = 2) -> None:
        super().__init__({f"layer{i}": DenseLayer(channels + i * growth) for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def dense_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), DenseBlock(), nn.BatchNorm2d(11))


@pytest.mark.usefixtures("concat_at_any_size")
def test_dense_layers_read_their_concatenation_from_a_shared_buffer_and_train_as_the_original():
    torch.manual_seed(0)
    original = dense_net().double()
    model, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    assert report.concat == [f"cat -> 1.layer{i}.norm1" for i in range(4)]
    assert "4 batch norm(s) of a concatenation" in str(report)
    assert isinstance(vars(model[1].layer2)["forward"], ResidualForward)
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert_trains_as(model, original, x)
    model.eval(), original.eval()
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    one = torch.randn(4, 7, 6, 6, dtype=torch.float64)  # a layer called with a tensor: its code
    torch.testing.assert_close(model[1].layer2(one), original[1].layer2(one), rtol=1e-12, atol=0)
    back = bnlab.revert(model)
    assert all("forward" not in vars(layer) for layer in back[1].values())


@pytest.mark.usefixtures("concat_at_any_size")
def test_dense_layers_use_the_buffer_kernels_in_the_model(monkeypatch):
    calls = []
    real = bnlab.concat.features_of
    monkeypatch.setattr(
        bnlab.concat, "features_of", lambda chunks: calls.append(len(chunks)) or real(chunks)
    )
    model = bnlab.convert(dense_net(), fuse_activations=True)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert calls == [2, 3, 4]  # the first layer reads its one chunk as it is


def test_fused_dense_layers_copy_pickle_and_trace_as_their_own_code():
    torch.manual_seed(0)
    model = bnlab.convert(dense_net(), fuse_activations=True).eval()
    x = torch.randn(2, 3, 6, 6)
    twin = copy.deepcopy(model)
    assert vars(twin[1].layer1)["forward"].block is twin[1].layer1
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x)) and torch.equal(twin(x), model(x))
    traced = torch.fx.GraphModule(model, LayerTracerForTools().trace(model))
    assert "concat_unit" not in traced.code
    torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)


class LayerTracerForTools(torch.fx.Tracer):  # as feature extraction does: norms stay whole
    def is_leaf_module(self, m, name):
        return isinstance(m, bnlab.nn.BatchNorm) or super().is_leaf_module(m, name)


@pytest.mark.usefixtures("concat_at_any_size")
def test_hooked_or_replaced_dense_norms_run_as_written():
    torch.manual_seed(0)
    original = dense_net().double()
    model = bnlab.convert(copy.deepcopy(original), fuse_activations=True)
    seen = []
    model[1].layer3.norm1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    assert seen == [9]  # the hook saw the concatenation, as in the original


@pytest.mark.usefixtures("concat_at_any_size")
def test_timm_densenet_fuses_every_dense_layer():
    timm = import_timm()
    torch.manual_seed(0)
    original = timm.create_model("densenet121", num_classes=10).double()
    model, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    assert len(report.concat) == 58
    assert report.concat[1] == "cat -> features.denseblock1.denselayer2.norm1"
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)  # block 4 at 2x2: 16 values a channel
    y, want = model(x), original(x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    y.sum().backward(), want.sum().backward()
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-8, msg=name)


@pytest.mark.usefixtures("concat_at_any_size")
def test_fused_dense_layers_compile_and_export_as_the_original():
    """Under torch.compile and torch.export the buffer's eager kernels step aside (the
    concatenation and batch norm run as traced ops): the same function."""
    torch.manual_seed(0)
    original = dense_net().double().eval()
    model = bnlab.convert(copy.deepcopy(original), fuse_activations=True).eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), original(x), rtol=1e-12, atol=1e-12)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), original(x), rtol=1e-12, atol=1e-12)
