"""bnlab run shift: the corruptions, the five test-time methods, the run, its report and resume."""

import copy
import csv
import json

import pytest
import torch
from torch import nn

from bnlab.inference import population_statistics
from bnlab.lab import shift
from bnlab.lab.common import images, load_data
from bnlab.lab.config import ConfigError, describe
from bnlab.lab.conv import ConvNet
from bnlab.lab.runner import CHECKPOINT, get_experiment, resume, start
from bnlab.lab.shift import (
    CORRUPTIONS,
    ShiftConfig,
    adabn_model,
    corrupt,
    evaluate_cell,
    predict,
    tent,
    with_statistics,
)
from bnlab.nn import BatchNorm

TINY = [
    "--steps=40",
    "--eval_every=10",
    "--checkpoint_every=15",
    "--severities=2,5",
    "--test_batch_sizes=8,64",
    "--test_examples=120",
    "--channels=4,8",
]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def test_set():
    flat = load_data("digits")
    return images(flat.test_x), flat.test_y


@pytest.fixture(scope="module")
def trained():
    """A small BN convnet after 150 SGD steps on the digits: running statistics away from 0 / 1."""
    flat = load_data("digits")
    x, y = images(flat.train_x), flat.train_y
    torch.manual_seed(0)
    model = ConvNet(8, (4, 8), 10, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        batch = torch.randint(len(y), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_affine_names(model):
    return {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, BatchNorm)
        for p in ("weight", "bias")
    }


# -- corruptions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corruption_is_deterministic_and_keeps_shape_and_range(name, test_set):
    x, _ = test_set
    clean = corrupt(x, name, 0, seed=0)
    assert torch.equal(clean, x) and clean is not x
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seed=0)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, corrupt(x, name, severity, seed=0))
    other_seed = corrupt(x, name, 3, seed=1)
    # only the noise and the rotations' directions are random
    assert torch.equal(other_seed, corrupt(x, name, 3, seed=0)) == (
        name not in ("gaussian_noise", "rotation")
    )


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_distance_from_clean_grows_with_the_severity(name, test_set):
    x, _ = test_set
    distances = [
        float((corrupt(x, name, s, seed=0) - x).flatten(1).norm(dim=1).mean()) for s in range(6)
    ]
    assert distances[0] == 0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_corruptions_on_mnist_sized_images_scale_their_lengths():
    x = torch.rand(3, 1, 28, 28)
    assert shift.blur_sigma(5, 28) == 6.0 and shift.blur_sigma(5, 8) == pytest.approx(6 * 8 / 28)
    assert [shift.pixelate_size(s, 28) for s in range(1, 6)] == [24, 21, 18, 10, 7]
    assert [shift.pixelate_size(s, 8) for s in range(1, 6)] == [7, 6, 5, 3, 2]
    for name in CORRUPTIONS:
        assert corrupt(x, name, 5).shape == x.shape


def test_bad_corruptions_fail():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="side, side"):
        corrupt(torch.rand(2, 64), "contrast", 1)


# -- methods ---------------------------------------------------------------------------------------


def test_adabn_is_population_statistics_of_the_corrupted_test_set(trained, test_set):
    x, y = test_set
    shifted = corrupt(x, "contrast", 4)
    adapted = adabn_model(trained, shifted)
    reference = copy.deepcopy(trained)
    population_statistics(reference, [shifted])
    for (name, a), (_, b) in zip(adapted.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name
    assert not torch.equal(adapted.features[1].running_mean, trained.features[1].running_mean)
    expected = shift.accuracy(predict(reference.eval(), shifted, len(shifted)), y)
    row = evaluate_cell(trained, shifted, y, ShiftConfig(methods=("adabn",)))
    assert row == {"adabn": expected}
    # in batches: Algorithm 2's average of the batches' statistics
    batched = adabn_model(trained, shifted, batch=100)
    again = copy.deepcopy(trained)
    population_statistics(again, [shifted[i : i + 100] for i in range(0, len(shifted), 100)])
    assert torch.equal(batched.features[5].running_var, again.features[5].running_var)


def test_tent_updates_only_the_bn_affine_parameters_and_predicts_before_each_update(
    trained, test_set
):
    x, _ = test_set
    shifted = corrupt(x, "gaussian_blur", 4)
    before = _state(trained)
    logits, adapted = tent(trained, shifted, 64, lr=1e-2)
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == _bn_affine_names(trained)  # every gamma and beta moved, nothing else
    batch_only = predict(with_statistics(trained, "batch"), shifted, 64)
    assert torch.equal(logits[:64], batch_only[:64])  # the first batch: before any update
    assert not torch.allclose(logits[64:], batch_only[64:])  # later ones: after the updates
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())


def test_every_method_starts_from_the_same_trained_model(trained, test_set):
    x, y = test_set
    shifted, labels = corrupt(x, "rotation", 3)[:50], y[:50]
    before = _state(trained)
    config = ShiftConfig(test_batch_sizes=(1, 16), severity_batch=16)
    row = evaluate_cell(trained, shifted, labels, config)
    expected = {"source", "adabn", "batch@1", "batch@16", "tent@1", "tent@16"}
    expected |= {f"mix{a:g}@{b}" for a in config.alphas for b in (1, 16)}
    assert set(row) == expected
    assert all(0.0 <= v <= 1.0 for v in row.values())
    state = trained.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in before.items())
    assert all(m.statistics == "standard" for m in trained.modules() if isinstance(m, BatchNorm))
    assert all(p.requires_grad for p in trained.parameters()) and not trained.training
    # each column is the method applied to the untouched model
    with torch.no_grad():
        source = trained(shifted).argmax(1)
    assert row["source"] == (source == labels).sum().item() / 50
    assert row["batch@16"] == shift.accuracy(
        predict(with_statistics(trained, "batch"), shifted, 16), labels
    )
    assert row["mix0.5@1"] == shift.accuracy(
        predict(with_statistics(trained, "mix", 0.5), shifted, 1), labels
    )
    assert row["tent@16"] == shift.accuracy(tent(trained, shifted, 16, 1e-3)[0], labels)


# -- the experiment --------------------------------------------------------------------------------


def test_the_config_checks_its_values_and_documents_every_key():
    exp = get_experiment("shift")
    assert [key for key, _, _, doc in describe(exp.config) if not doc] == []
    config = exp.make_config([])
    assert config.steps == 2000 and config.eval_every == 100
    mnist = exp.make_config(["--dataset=mnist"])
    assert (mnist.steps, mnist.test_examples, config.test_examples) == (6000, 2000, None)
    for bad, message in (
        ("--corruptions=fog", "corruptions must be some of"),
        ("--methods=source,ttt", "methods must be some of"),
        ("--severities=0,5", "severities must be in 1..5"),
        ("--alphas=0.5,1", "alphas must be in"),
        ("--severity_batch=32", "severity_batch 32 is not in"),
        ("--tent_lr=0", "tent_lr must be > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            exp.make_config([bad])


def test_a_tiny_run_writes_its_table_plots_and_report(tmp_path):
    directory, report = start("shift", TINY, out=tmp_path, progress=False)
    for name in ("report.md", "summary.json", "metrics.json", shift.MODEL, shift.ACCURACY_CSV):
        assert (directory / name).stat().st_size > 0, name
    for name in (shift.SEVERITY_PLOT, shift.BATCH_PLOT):
        assert (directory / name).stat().st_size > 1000, name
    rows = json.loads((directory / "metrics.json").read_text())
    assert [r["job"] for r in rows if r["job"] != "train"] == ["clean/0"] + [
        f"{c}/{s}" for c in CORRUPTIONS for s in (2, 5)
    ]
    assert [r["step"] for r in rows if r["job"] == "train"] == [10, 20, 30, 40]
    cell = next(r for r in rows if r["job"] == "contrast/5")
    assert len([k for k in cell if k == "source" or "@" in k or k == "adabn"]) == 2 + 5 * 2
    with (directory / shift.ACCURACY_CSV).open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 11 * (2 + 5 * 2)
    assert all(0 <= float(r["accuracy"]) <= 1 for r in table)
    assert {r["method"] for r in table} == set(shift.METHODS)
    text = (directory / "report.md").read_text()
    for word in (*CORRUPTIONS, "source", "AdaBN", "mix alpha=0.25", "batch", "TENT"):
        assert word in text, word
    for paper in (
        "Li et al. 2016",
        "Nado et al. 2020",
        "Schneider et al. 2020",
        "Wang et al. 2021",
    ):
        assert paper in text, paper
    claims = report.summary["claims"]
    assert set(claims.values()) <= {"holds", "does not hold", "tie"} and len(claims) == 7
    assert report.summary["clean"]["source"] == cell_value(rows, "clean/0", "source")
    assert f"![accuracy by severity]({shift.SEVERITY_PLOT})" in text


def cell_value(rows, job, column):
    return next(r[column] for r in rows if r["job"] == job)


@pytest.mark.parametrize("where", ["train", "cells"])
def test_an_interrupted_run_resumes_to_identical_metrics(tmp_path, monkeypatch, where):
    """Killed inside the training job (after its checkpoint at step 15, at the evaluation of step
    30) or at the third evaluated set, then resumed: the metrics equal an uninterrupted run's."""
    whole, _ = start("shift", TINY, out=tmp_path / "whole", progress=False)
    target = "save_model" if where == "train" else "evaluate_cell"
    original, calls = getattr(shift, target), []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(shift, target, crash)
    with pytest.raises(Interrupt):
        start("shift", TINY, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(shift, target, original)
    cut = next((tmp_path / "cut" / "shift").iterdir())
    checkpoint = torch.load(cut / CHECKPOINT, weights_only=True)
    if where == "train":
        assert checkpoint["job"] == "train" and checkpoint["step"] == 15
    else:
        assert checkpoint["job"] is None
        assert checkpoint["completed"] == ["train", "clean/0", "gaussian_noise/2"]
    assert json.loads((cut / "run.json").read_text())["status"] == "running"
    resume(cut, progress=False)
    assert (cut / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert (cut / "summary.json").read_text() == (whole / "summary.json").read_text()
