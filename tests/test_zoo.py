"""What a user does with a timm model, end to end, on a sample of architectures at small inputs:
convert, train in float64 beside the original (outputs, gradients, running statistics), evaluate,
move checkpoints both ways, revert, then freeze, fold and export to ONNX (onnxruntime parity)."""

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.export import export_onnx
from bnlab.inference import batch_norm_layers, batch_norms_in_graph, fold, freeze
from test_inference import randomize
from torchvision_standin import import_timm

timm = import_timm()

# convnext's LayerNorm2d (a LayerNorm subclass with its own forward) is left, and said so
pytestmark = pytest.mark.filterwarnings("ignore:bnlab.convert left:bnlab.ConversionWarning")

MODELS = [
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "densenet121",
    "regnety_002",
    "convnext_atto",
]
OUT_TOL, GRAD_TOL, STATS_TOL = 1e-7, 1e-6, 1e-9  # float64, as the real-models acceptance states


@pytest.fixture(autouse=True)
def one_thread():
    """Whole models in float64 are several times faster on one thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, bnlab.nn.BatchNorm))


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_close(actual, expected, tol, what):
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("name", MODELS)
def test_convert_train_evaluate_checkpoint_revert(name):
    original = build(name).double()
    bn_types = {k: type(m) for k, m in original.named_modules() if is_batch_norm(m)}
    keys = list(original.state_dict())
    ours, report = bnlab.convert(copy.deepcopy(original), report=True)
    converted = {k: m for k, m in ours.named_modules() if is_batch_norm(m)}
    assert set(converted) == set(bn_types)
    assert all(isinstance(m, bnlab.nn.BatchNorm) for m in converted.values()), "not all taken over"
    assert report.num_converted >= len(bn_types)
    assert list(ours.state_dict()) == keys

    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    for step in range(2):
        (out_a, grads_a), (out_b, grads_b) = train_step(original, x, y), train_step(ours, x, y)
        assert_close(out_b, out_a, OUT_TOL, f"step {step} output")
        for k in grads_a:
            assert_close(grads_b[k], grads_a[k], GRAD_TOL, f"step {step} grad {k}")
        with torch.no_grad():
            for p in (*original.parameters(), *ours.parameters()):
                p -= 0.1 * p.grad
    state_a, state_b = original.state_dict(), ours.state_dict()
    for k in state_a:
        tol = STATS_TOL if "running" in k else GRAD_TOL
        assert_close(state_b[k].double(), state_a[k].double(), tol, k)
    with torch.no_grad():
        assert_close(ours.eval()(x), original.eval()(x), OUT_TOL, "eval output")

    fresh = bnlab.convert(build(name).double())  # a timm checkpoint loads into bnlab, and back
    fresh.load_state_dict(state_a)
    back = bnlab.revert(copy.deepcopy(ours))
    back.load_state_dict(fresh.state_dict())
    assert {k: type(m) for k, m in back.named_modules() if is_batch_norm(m)} == bn_types
    with torch.no_grad():
        assert_close(back.eval()(x), original(x), OUT_TOL, "reverted eval output")


@pytest.mark.parametrize("name", MODELS)
def test_freeze_fold_and_export_the_converted_model(name, tmp_path):
    model = bnlab.convert(randomize(build(name))).eval()
    has_batch_norm = bool(batch_norm_layers(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    scale = expected.abs().max().item()
    if has_batch_norm:
        frozen = freeze(copy.deepcopy(model))
        assert not any(is_batch_norm(m) for m in frozen.modules())
        with torch.no_grad():
            assert (frozen(x) - expected).abs().max().item() <= 1e-5 * scale
        folded, report = fold(copy.deepcopy(model), x)
        assert not any(is_batch_norm(m) for m in folded.modules())
        assert not batch_norms_in_graph(folded)
        with torch.no_grad():
            assert (folded(x) - expected).abs().max().item() <= 1e-4 * scale
        assert len(report.folded) + len(report.frozen) == len(batch_norm_layers(model))
    if name in ("resnet50", "efficientnet_b0"):  # export takes seconds a model: two of them
        exported = export_onnx(copy.deepcopy(model), x, tmp_path / f"{name}.onnx")
        assert exported.max_abs_error <= 1e-4 * scale


def test_resnet50_fused_activations_train_as_timm():
    """convert(fuse_activations=True) on timm's ResNet-50: every bn1/bn2 (and the stem's) takes
    its ReLU (33 pairs; bn3 feeds the residual sum), and a float64 step is timm's."""
    original = build("resnet50").double()
    ours, report = bnlab.convert(copy.deepcopy(original), report=True, fuse_activations=True)
    assert len(report.fused) == 33 and "layer1.0.bn1 -> layer1.0.act1" in report.fused
    assert list(ours.state_dict()) == list(original.state_dict())
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    (out, grads), (want, want_grads) = train_step(ours, x, y), train_step(original, x, y)
    assert_close(out, want, OUT_TOL, "output")
    for key, grad in want_grads.items():
        assert_close(grads[key], grad, GRAD_TOL, f"grad {key}")
    back = bnlab.revert(ours)
    assert {type(m) for m in back.modules()} == {type(m) for m in original.modules()}
