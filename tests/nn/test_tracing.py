"""bnlab's layers as torch.fx leaves: ``torch.fx.symbolic_trace`` of a converted model."""

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab import nn as bnn
from torchvision_standin import import_timm

LAYERS = {
    "BatchNorm2d": lambda: bnn.BatchNorm2d(4),
    "BatchNormAct2d": lambda: bnn.BatchNormAct2d(4, activation="leaky_relu", activation_param=0.2),
    "InPlaceABN2d": lambda: bnn.InPlaceABN2d(4),
    "GhostBatchNorm2d": lambda: bnn.GhostBatchNorm2d(4, virtual_batch_size=2),
    "BatchRenorm2d": lambda: bnn.BatchRenorm2d(4),
    "FrozenBatchNorm2d": lambda: bnn.FrozenBatchNorm2d(4),
    "FrozenBatchNormAct2d": lambda: bnn.FrozenBatchNormAct2d(4),
    "LayerNorm": lambda: bnn.LayerNorm([4, 5, 5]),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_each_layer_is_one_call_module_node_and_runs_as_itself(name, training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LAYERS[name](), nn.ReLU())
    model.train(training)
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2"]
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(traced(x), twin(x), rtol=0, atol=0)
    for key, value in twin.state_dict().items():  # running statistics moved alike
        torch.testing.assert_close(traced.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [False, True], ids=["defaults", "fused"])
def test_a_converted_timm_model_traces_with_symbolic_trace(fuse):
    timm = import_timm()
    torch.manual_seed(0)
    model = bnlab.convert(timm.create_model("resnet18", num_classes=10), fuse_activations=fuse)
    traced = torch.fx.symbolic_trace(model)
    layers = dict(traced.named_modules())
    norms = [
        n.target
        for n in traced.graph.nodes
        if n.op == "call_module" and isinstance(layers[n.target], bnn.BatchNorm)
    ]
    assert len(norms) == 20 and norms[0] == "bn1" and "layer2.0.downsample.1" in norms
    model.eval(), traced.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(3), bnn.BatchNorm2d(3)], ids=["torch", "bnlab"])
def test_a_layer_outside_the_traced_module_raises_as_torch_nn_s(layer):
    def f(x):
        return layer(x) * 2

    with pytest.raises(NameError, match="not installed as a submodule"):
        torch.fx.symbolic_trace(f)
