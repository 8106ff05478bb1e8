"""bnlab.doctor: each planted defect is found on exactly its layer, healthy layers get nothing,
repair closes the eval gap, and the report prints, exports and plots."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import bnlab
from bnlab.data import load_digits
from bnlab.doctor import KINDS, Diagnosis, diagnose, repair


class Net(nn.Module):
    """Batch norms of both libraries, after convolutions and a Linear, at four depths."""

    def __init__(self, conv_bias: bool = False, linear_bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=conv_bias)
        self.bn2 = bnlab.nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(256, 32, bias=linear_bias)
        self.bn4 = bnlab.nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)  # a bias feeding no batch norm: nothing to say

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc2(torch.relu(self.bn4(self.fc1(x.flatten(1)))))


@pytest.fixture(scope="module")
def digits():
    split = load_digits()
    return split.train_x.view(-1, 1, 8, 8), split.train_y


def trained(digits, **kwargs) -> Net:
    """A healthy model: trained, then its running statistics settled with the weights fixed."""
    torch.manual_seed(0)
    net = Net(**kwargs)
    fit(net, digits, epochs=2)
    return settle(net, digits)


def fit(model: nn.Module, digits, epochs: int) -> nn.Module:
    """SGD with momentum on the digits in batches of 64, in order."""
    x, y = digits
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def settle(net: Net, digits) -> Net:
    """Running statistics that describe the model as it is (weights fixed), then eval mode."""
    x, _ = digits
    net.train()
    for _ in range(3):
        for i in range(0, len(x), 64):
            net(x[i : i + 64])
    return net.eval()


@pytest.fixture(scope="module")
def healthy(digits):
    return trained(digits)


def batches(digits, size=128):
    x, y = digits
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def found(diagnosis: Diagnosis) -> set:
    return {(f.layer, f.kind) for f in diagnosis.findings}


def test_healthy_model_has_no_finding(healthy, digits):
    d = diagnose(healthy, batches(digits))
    assert found(d) == set()
    assert all(row.distance < 0.05 for row in d.layers)
    assert d.gap["output_gap"] < 0.05
    assert d.gap["eval_accuracy"] == pytest.approx(d.gap["population_accuracy"], abs=0.01)


def reset(net, name):
    net.get_submodule(name).reset_running_stats()


def non_finite(net, name, value):
    net.get_submodule(name).running_var[1] = value


def scale_weights(net, name, factor):
    net.get_submodule(name).weight.data.mul_(factor)


def zero_gamma(net, name):
    net.get_submodule(name).weight.data[2] = 0.0  # then settled: downstream layers have seen it


PLANTS = [
    ("never-updated", "bn2", lambda net: reset(net, "bn2")),
    ("never-updated", "bn3", lambda net: reset(net, "bn3")),
    ("non-finite-statistics", "bn1", lambda net: non_finite(net, "bn1", math.inf)),
    ("non-finite-statistics", "bn4", lambda net: non_finite(net, "bn4", math.nan)),
    ("stale-statistics", "bn1", lambda net: scale_weights(net, "conv1", 2.0)),
    ("stale-statistics", "bn3", lambda net: scale_weights(net, "conv3", 0.5)),
    ("train-mode-in-eval", "bn2", lambda net: net.bn2.train()),
    ("train-mode-in-eval", "bn3", lambda net: net.bn3.train()),
    ("dead-channels", "bn1", lambda net: zero_gamma(net, "bn1")),
    ("dead-channels", "bn4", lambda net: zero_gamma(net, "bn4")),
]


@pytest.mark.parametrize("kind, layer, plant", PLANTS, ids=[f"{k}-{n}" for k, n, _ in PLANTS])
def test_planted_defect_found_on_its_layer_alone(healthy, digits, kind, layer, plant):
    net = copy.deepcopy(healthy)
    with torch.no_grad():
        plant(net)
    if kind == "dead-channels":  # a channel that died in training: the statistics saw it
        settle(net, digits)
    d = diagnose(net, batches(digits))
    assert found(d) == {(layer, kind)}
    (finding,) = d.findings
    assert finding.severity in ("error", "warning", "info") and finding.detail and finding.fix


def test_all_kinds_are_plantable_at_once(digits):
    net = trained(digits, conv_bias=True)
    with torch.no_grad():
        zero_gamma(net, "bn1")
    settle(net, digits)
    with torch.no_grad():
        net.bn1.train()
        reset(net, "bn2")
        scale_weights(net, "conv3", 3.0)
        non_finite(net, "bn4", math.nan)
    d = diagnose(net, batches(digits, size=16))  # bn4: 16 values per channel; bn3: 256
    assert found(d) == {
        ("bn1", "train-mode-in-eval"),
        ("bn1", "dead-channels"),
        ("bn2", "never-updated"),
        ("bn2", "redundant-bias"),
        ("bn3", "stale-statistics"),
        ("bn4", "non-finite-statistics"),
        ("bn4", "small-batch"),
    }
    assert {f.kind for f in d.findings} == set(KINDS)
    assert math.isinf(d.gap["output_gap"])
    rows = {row.layer: row for row in d.layers}
    assert rows["bn4"].explains == 1.0  # the one layer whose repair makes the outputs finite


@pytest.mark.parametrize("conv_bias, linear_bias", [(True, False), (False, True)])
def test_redundant_bias_of_conv_and_linear(digits, conv_bias, linear_bias):
    d = diagnose(trained(digits, conv_bias=conv_bias, linear_bias=linear_bias), batches(digits))
    assert found(d) == {("bn2" if conv_bias else "bn4", "redundant-bias")}


def test_linear_over_sequence_is_no_redundant_bias():
    """A Linear on (N, L, F) biases features, a BatchNorm1d on (N, L, F) normalizes over L."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(5)).eval()
    data = [torch.randn(64, 5, 6) for _ in range(4)]
    with torch.no_grad():
        model.train()
        for _ in range(40):
            for x in data:
                model(x)
        model.eval()
    assert found(diagnose(model, data)) == set()


def test_small_batch_only_where_few_values(healthy, digits):
    d = diagnose(healthy, batches(digits, size=16))
    assert found(d) == {("bn4", "small-batch")}
    rows = {row.layer: row for row in d.layers}
    assert (rows["bn1"].values_per_channel, rows["bn3"].values_per_channel) == (16 * 64, 16 * 16)


def test_repair_closes_the_gap_of_a_never_updated_model(digits):
    torch.manual_seed(0)
    net = Net()
    for module in net.modules():  # trained with statistics never recorded
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(
            module, bnlab.nn.BatchNorm
        ):
            module.momentum = 0.0
    fit(net, digits, epochs=1).eval()
    before = copy.deepcopy(net.state_dict())
    d = diagnose(net, batches(digits))
    assert {f.kind for f in d.findings} == {"never-updated"}
    assert d.gap["eval_accuracy"] < d.gap["population_accuracy"] - 0.2
    assert {k: torch.equal(v, net.state_dict()[k]) for k, v in before.items()} == {
        k: True for k in before
    }  # diagnose changed nothing
    repaired = repair(net, d)
    assert repaired == [row.layer for row in d.layers if row.distance > 0.2]
    after = diagnose(net, batches(digits))
    assert found(after) == set()
    assert after.gap["eval_accuracy"] == pytest.approx(d.gap["population_accuracy"], abs=0.01)
    changed = {k for k, v in before.items() if not torch.equal(v, net.state_dict()[k])}
    assert changed == {f"{n}.{s}" for n in repaired for s in ("running_mean", "running_var")}


def test_report_prints_exports_and_plots(healthy, digits, tmp_path):
    net = copy.deepcopy(healthy)
    reset(net, "bn3")
    d = diagnose(net, batches(digits))
    text = str(d)
    assert "bn3" in text and "never-updated" in text and "fix:" in text
    data = json.loads(d.to_json())
    assert [f["kind"] for f in data["findings"]] == ["never-updated"]
    assert {row["layer"] for row in data["layers"]} == {"bn1", "bn2", "bn3", "bn4"}
    assert data["gap"]["output_gap"] > 0.05
    d.plot(tmp_path / "doctor.png")
    assert (tmp_path / "doctor.png").stat().st_size > 1000


def test_bad_input_is_named(healthy):
    with pytest.raises(ValueError, match="at least one batch"):
        diagnose(healthy, [])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        diagnose(nn.Linear(3, 3), [torch.randn(4, 3)])


def test_timm_model_converted_and_not(digits):
    """timm's BatchNormAct2d (a torch.nn subclass) and bnlab's converted layers alike."""
    from torchvision_standin import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(  # zero_init_last would give every block dead channels
        "resnet10t", pretrained=False, num_classes=10, in_chans=1, zero_init_last=False
    )
    data = [torch.randn(32, 1, 32, 32) * 2 + 1 for _ in range(4)]  # layer4: 32 values a channel
    with torch.no_grad():
        model.train()
        for _ in range(20):
            for x in data:
                model(x)
    model.eval()
    for converted in (False, True):
        net = bnlab.convert(copy.deepcopy(model)) if converted else copy.deepcopy(model)
        with torch.no_grad():
            net.get_submodule("layer2.0.bn1").reset_running_stats()
            net.get_submodule("layer3.0.bn2").running_mean[0] = math.nan
        d = diagnose(net, data, explain=False)
        assert found(d) == {
            ("layer2.0.bn1", "never-updated"),
            ("layer3.0.bn2", "non-finite-statistics"),
        }, converted
        assert len(d.layers) == len(bnlab.inference.batch_norm_layers(net))


def never_updated_sequential(digits) -> nn.Sequential:
    """A picklable model (torch.nn and bnlab layers) trained with momentum 0: running statistics
    never left their initial values."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=0.0),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        bnlab.nn.BatchNorm2d(16, momentum=0.0),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    )
    return fit(model, digits, epochs=2).eval()


def test_doctor_command_fixes_a_never_updated_model(digits, tmp_path):
    from click.testing import CliRunner

    from bnlab.cli import main
    from bnlab.data import load_batches

    path, fixed = tmp_path / "model.pt", tmp_path / "fixed.pt"
    torch.save(never_updated_sequential(digits), path)
    args = [str(path), "--data", "digits", "--shape", "1,8,8", "--fix", str(fixed)]
    args += ["--json", str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png")]
    result = CliRunner().invoke(main, ["doctor", *args])
    assert result.exit_code == 0, result.output
    assert "never-updated" in result.output and "repaired 2 layer(s): 1, 4" in result.output
    assert {f["layer"] for f in json.loads((tmp_path / "d.json").read_text())["findings"]} == {
        "1",
        "4",
    }
    assert (tmp_path / "d.png").stat().st_size > 1000
    data = load_batches("digits", shape=(1, 8, 8))
    model = torch.load(fixed, weights_only=False)
    after = diagnose(model, data)
    assert found(after) == set()
    before = diagnose(torch.load(path, weights_only=False), data, explain=False)
    assert before.gap["eval_accuracy"] < before.gap["population_accuracy"] - 0.2
    assert after.gap["eval_accuracy"] >= before.gap["population_accuracy"] - 0.01


def test_doctor_command_names_bad_input(tmp_path):
    from click.testing import CliRunner

    from bnlab.cli import main

    torch.save({"weight": torch.ones(3)}, tmp_path / "state.pt")
    result = CliRunner().invoke(main, ["doctor", str(tmp_path / "state.pt"), "--data", "digits"])
    assert result.exit_code != 0 and "torch.nn.Module" in result.output
    torch.save(nn.Sequential(nn.BatchNorm1d(64)), tmp_path / "m.pt")
    result = CliRunner().invoke(
        main, ["doctor", str(tmp_path / "m.pt"), "--data", "digits", "--shape", "1,9,9"]
    )
    assert result.exit_code != 0 and "64 values" in result.output
    result = CliRunner().invoke(main, ["doctor", str(tmp_path / "m.pt"), "--data", "nowhere"])
    assert result.exit_code != 0 and "'digits', an MNIST directory" in result.output
