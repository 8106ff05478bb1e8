"""freeze and fold on timm's architectures, at small inputs, with non-trivial running statistics.

The models use timm's BatchNormAct2d (batch norm, then a drop layer, then an activation, in one
nn.BatchNorm2d subclass), torch.nn's BatchNorm2d, and one model torch.fx cannot trace
(mobilevit_xxs). freeze and fold must find every batch norm, keep every activation, and leave the
eval output within 1e-5 (freeze, exact maps) and 1e-4 (fold, weights changed in float64 and cast)
relative to its magnitude.
"""

import copy
from functools import lru_cache

import pytest
import torch
from torch import fx, nn

from bnlab.inference import batch_norm_layers, batch_norms_in_graph, fold, freeze
from bnlab.nn import FrozenBatchNorm, FrozenBatchNormAct2d
from test_inference import randomize
from torchvision_standin import import_timm

timm = import_timm()

# name -> (batch norms, of them not foldable into a neighbour): densenet's pre-activation batch
# norms follow a concatenation or a pooling and precede their activation, so they are frozen
MODELS = {
    "efficientnet_b0": (49, 0),
    "mobilenetv3_large_100": (46, 0),
    "densenet121": (121, 62),
    "regnety_002": (44, 0),
    "resnet50": (53, 0),
}
UNTRACEABLE = "mobilevit_xxs"  # control flow on tensor shapes: torch.fx cannot trace it
FREEZE_TOL, FOLD_TOL = 1e-5, 1e-4


@lru_cache(maxsize=None)
def model_and_output(name):
    """The eval-mode model with every batch norm randomized, a 32x32 input, the eval output."""
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def relative_error(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item()


def activations(model):
    """Each timm batch norm + activation's (drop, act) module objects, by name."""
    return {
        name: (bn.drop, bn.act)
        for name, bn in batch_norm_layers(model).items()
        if isinstance(bn, timm.layers.BatchNormAct2d)
    }


@pytest.mark.parametrize("name", [*MODELS, UNTRACEABLE])
def test_freeze_timm(name):
    original, x, expected = model_and_output(name)
    model = copy.deepcopy(original)
    kept = activations(model)
    with torch.no_grad():
        out = freeze(model)(x)
    assert not batch_norm_layers(model)
    assert relative_error(out, expected) <= FREEZE_TOL
    for layer, (drop, act) in kept.items():  # never an activation or a drop layer dropped
        frozen = model.get_submodule(layer)
        assert type(frozen) is FrozenBatchNormAct2d
        assert frozen.drop is drop and frozen.act is act


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_timm(name):
    model, x, expected = model_and_output(name)
    count, frozen = MODELS[name]
    with torch.no_grad():
        gm, report = fold(model, x)
        out = gm(x)
    assert isinstance(gm, fx.GraphModule) and report.untraced is None
    assert batch_norms_in_graph(gm) == [] and not batch_norm_layers(gm)
    assert len(report.folded) + len(report.frozen) == count == len(batch_norm_layers(model))
    assert len(report.frozen) == frozen
    assert {bn for bn, _, _ in report.folded} | set(report.frozen) == set(batch_norm_layers(model))
    assert relative_error(out, expected) <= FOLD_TOL
    frozen_maps = [m for m in gm.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(frozen_maps) == frozen


def test_fold_freezes_a_timm_model_fx_cannot_trace():
    model, x, expected = model_and_output(UNTRACEABLE)
    with torch.no_grad():
        folded, report = fold(model, x)
        out = folded(x)
    assert "torch.fx cannot trace" in report.untraced and not report.folded
    assert set(report.frozen) == set(batch_norm_layers(model)) and not batch_norm_layers(folded)
    assert relative_error(out, expected) <= FREEZE_TOL


def test_freeze_and_fold_a_model_without_batch_norm_say_so():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not batch_norm_layers(model)  # its norms are LayerNorm2d
    with pytest.raises(ValueError, match="no batch-norm"):
        freeze(model)
    with pytest.raises(ValueError, match="no batch-norm"):
        fold(model, x)


def test_timm_sync_and_frozen_variants():
    """timm's SyncBatchNormAct (one process, eval) freezes with its activation; timm's own
    FrozenBatchNormAct2d is no batch norm and is left as it is."""
    bn = timm.layers.BatchNormAct2d(4, act_layer=nn.Hardswish)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1))).double()
    model = timm.layers.convert_sync_batchnorm(model).eval()
    assert type(model[1]).__name__ == "SyncBatchNormAct"
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    gm, report = fold(model, x)
    assert report.folded == [("1", "0", "after")] and batch_norms_in_graph(gm) == []
    torch.testing.assert_close(gm(x), expected, atol=1e-12, rtol=1e-12)
    act = model[1].act
    assert freeze(model)[1].act is act
    torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
