"""Acceptance on a ResNet-style CNN and an MLP (bnlab and torch.nn BNs mixed): fold in PyTorch, then
bnlab.export.export_onnx and `bnlab export`: ONNX with no BatchNormalization node, checked in
onnxruntime against PyTorch. The exporter takes seconds per model: few exports here."""

import re
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import bnlab
from bnlab.cli import main
from bnlab.export import export_onnx
from bnlab.inference import batch_norm_layers, fold
from test_inference import BN, Net, check_fold, data, randomize, shared_bn

# ---- the acceptance models, folded in PyTorch ------------------------------------------------


def block(c, lib_a, lib_b):
    return Net(
        lambda s, x: F.relu(x + s.bn_b(s.conv_b(F.relu(s.bn_a(s.conv_a(x)))))),
        conv_a=nn.Conv2d(c, c, 3, padding=1, bias=False),
        bn_a=BN[lib_a][2](c),
        conv_b=nn.Conv2d(c, c, 3, padding=1, bias=False),
        bn_b=BN[lib_b][2](c),
    )


def resnet_forward(s, x):
    x = s.block1(F.relu(s.bn_stem(s.stem(x))))
    x = s.conv_pre(s.bn_pre(x))  # a BN before a conv
    x = s.block2(F.relu(s.bn_g(s.grouped(x))))
    x = F.relu(s.bn_up(s.up(x)))
    return s.fc2(F.relu(s.bn_fc(s.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))))


def resnetish():
    """conv-BN-ReLU blocks with residual additions, a BN before a conv, a grouped conv, a
    ConvTranspose."""
    return randomize(
        Net(
            resnet_forward,
            stem=nn.Conv2d(3, 8, 3, padding=1),
            bn_stem=bnlab.nn.BatchNorm2d(8),
            block1=block(8, "bnlab", "torch"),
            bn_pre=nn.BatchNorm2d(8),
            conv_pre=nn.Conv2d(8, 16, 1),
            grouped=nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False),
            bn_g=bnlab.nn.BatchNorm2d(16),
            block2=block(16, "torch", "bnlab"),
            up=nn.ConvTranspose2d(16, 8, 2, stride=2),
            bn_up=nn.BatchNorm2d(8),
            fc1=nn.Linear(8, 12),
            bn_fc=bnlab.nn.BatchNorm1d(12),
            fc2=nn.Linear(12, 5),
        )
    ).eval()


RESNET_FOLDS = {
    ("bn_stem", "stem", "after"),
    ("block1.bn_a", "block1.conv_a", "after"),
    ("block1.bn_b", "block1.conv_b", "after"),
    ("bn_pre", "conv_pre", "before"),
    ("bn_g", "grouped", "after"),
    ("block2.bn_a", "block2.conv_a", "after"),
    ("block2.bn_b", "block2.conv_b", "after"),
    ("bn_up", "up", "after"),
    ("bn_fc", "fc1", "after"),
}


def mlp():
    return randomize(
        nn.Sequential(
            nn.Linear(10, 32),
            bnlab.nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.BatchNorm1d(32),
            nn.Linear(32, 16, bias=False),
            bnlab.nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
    ).eval()


MLP_FOLDS = [("1", "0", "after"), ("3", "4", "before"), ("5", "4", "after")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=str)
def test_fold_resnet(dtype, tol):
    model, x = resnetish().to(dtype), data((2, 3, 8, 8), 0, dtype=dtype)
    _, report = check_fold(model, x, frozen={}, tol=tol)
    assert set(report.folded) == RESNET_FOLDS and len(report.folded) == 9
    assert report.max_abs_error <= tol


def test_fold_mlp_float32():
    model, x = mlp(), data((16, 10), 0, dtype=torch.float32)
    _, report = check_fold(model, x, folded=MLP_FOLDS, frozen={}, tol=1e-5)
    assert report.max_abs_error <= 1e-5 and "folded 3, frozen 0" in str(report)


def test_fold_drops_folded_layers():
    gm, report = fold(mlp(), data((16, 10), 0, dtype=torch.float32))
    assert len(report.folded) == 3
    assert not batch_norm_layers(gm)
    assert not any(key.endswith("running_mean") for key in gm.state_dict())


def test_fold_rejects_bad_input():
    model = resnetish()
    with pytest.raises(ValueError, match=re.escape("(2, 5, 8, 8)")):
        fold(model, torch.randn(2, 5, 8, 8))
    model.block2.train()
    with pytest.raises(ValueError, match="eval"):
        fold(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="batch-norm"):
        fold(nn.Sequential(nn.Linear(3, 3)).eval(), torch.randn(2, 3))
    model = resnetish()
    model.block1.bn_b.running_var[3] = float("nan")
    with pytest.raises(ValueError, match="block1.bn_b"):
        fold(model, torch.randn(2, 3, 8, 8))


# ---- export ----------------------------------------------------------------------------------


def op_types(path):
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def run_onnxruntime(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [arg.name for arg in session.get_inputs()]
    (out,) = session.run(None, {name: x.numpy()})
    return torch.from_numpy(out)


MODELS = {
    "resnet": (resnetish, (2, 3, 8, 8), 9),
    "mlp": (mlp, (16, 10), 3),
    # a BN shared by two call sites cannot fold: frozen, and still no BatchNormalization node
    "frozen": (lambda: randomize(shared_bn(nn.BatchNorm2d(4))).eval(), (2, 4, 6, 6), 0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_onnx(name, tmp_path):
    build, shape, folds = MODELS[name]
    model = build()
    x = data(shape, 0, dtype=torch.float32)
    expected = model(x).detach()  # eval, unfolded
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_onnx(model, x, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").is_file() and report.path == tmp_path / "model.onnx"
    ops = op_types(tmp_path / "model.onnx")
    assert "BatchNormalization" not in ops, ops
    assert report.op_counts == dict(ops)
    assert len(report.fold.folded) == folds
    assert set(report.fold.frozen) == (set() if folds else {"bn"})
    out = run_onnxruntime(tmp_path / "model.onnx", x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert report.max_abs_error <= 1e-4
    assert report.max_abs_error == pytest.approx(
        (out - model(x).detach()).abs().max().item(), abs=1e-6
    )
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # model untouched
    assert f"folded {folds}, frozen {len(report.fold.frozen)}" in str(report)


def cli_model():
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            bnlab.nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 1, groups=2),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 4, 2, stride=2),
            bnlab.nn.BatchNorm2d(4),
        )
    ).eval()


def test_cli_export(tmp_path):
    torch.save(cli_model(), tmp_path / "model.pt")
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "model.pt"), "--to", str(out), "--input-shape", "2,3,8,8"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and "BatchNormalization" not in op_types(out)
    assert f"wrote {out}" in result.output
    assert "folded 3, frozen 0" in result.output
    assert "3 -> 4 (BN before it)" in result.output
    error = re.search(r"onnxruntime vs PyTorch: max abs error (\S+)", result.output)
    assert error and float(error.group(1)) <= 1e-4
    x = torch.randn(2, 3, 8, 8)  # the written model works on any input of that shape
    expected = torch.load(tmp_path / "model.pt", weights_only=False)(x).detach()
    np.testing.assert_allclose(
        run_onnxruntime(out, x).numpy(), expected.numpy(), atol=1e-4, rtol=1e-4
    )


def test_cli_export_rejects_state_dict(tmp_path):
    torch.save(cli_model().state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "weights.pt"), "--to", str(out), "--input-shape", "2,3,8,8"]
    )
    assert result.exit_code != 0 and "state_dict" in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("shape", ["2,3,x,8", "", "2;3;8;8"])
def test_cli_export_rejects_unparsable_input_shape(shape, tmp_path):
    torch.save(cli_model(), tmp_path / "model.pt")
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "model.pt"),
            "--to",
            str(tmp_path / "m.onnx"),
            "--input-shape",
            shape,
        ],
    )
    assert result.exit_code == 2 and "--input-shape" in result.output, result.output
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_reports_wrong_input_shape(tmp_path):
    torch.save(cli_model(), tmp_path / "model.pt")
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(tmp_path / "model.pt"),
            "--to",
            str(tmp_path / "m.onnx"),
            "--input-shape",
            "2,5,8,8",
        ],
    )
    assert result.exit_code != 0 and not (tmp_path / "m.onnx").exists()
    assert "(2, 5, 8, 8)" in result.output, result.output


# ---- batch norm + activation modules (timm), and the ONNX extra -------------------------------


def test_export_onnx_timm_batch_norm_act(tmp_path):
    """timm's BatchNormAct2d: the batch norm folds or freezes, its activation is exported."""
    from torchvision_standin import import_timm

    timm = import_timm()

    def forward(s, x):  # conv -> bn+SiLU (folds); + x -> bn+hard-swish (frozen)
        return s.bn2(s.bn1(s.conv(x)) + x)

    model = randomize(
        Net(
            forward,
            conv=nn.Conv2d(4, 4, 3, padding=1),
            bn1=timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU),
            bn2=timm.layers.BatchNormAct2d(4, act_layer=nn.Hardswish),
        )
    ).eval()
    x = data((2, 4, 6, 6), 0, dtype=torch.float32)
    expected = model(x).detach()
    report = export_onnx(model, x, tmp_path / "model.onnx")
    ops = op_types(tmp_path / "model.onnx")
    assert "BatchNormalization" not in ops and ops["HardSwish"] == 1, ops
    assert report.fold.folded == [("bn1", "conv", "after")] and list(report.fold.frozen) == ["bn2"]
    out = run_onnxruntime(tmp_path / "model.onnx", x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert report.max_abs_error == pytest.approx((out - expected).abs().max().item(), abs=1e-6)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_export_onnx_without_the_onnx_extra_says_what_to_install(missing, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it now fails
    with pytest.raises(ImportError, match=re.escape("pip install 'bnlab[onnx]'")) as error:
        export_onnx(mlp(), data((16, 10), 0, dtype=torch.float32), tmp_path / "m.onnx")
    assert missing in str(error.value) and not (tmp_path / "m.onnx").exists()
