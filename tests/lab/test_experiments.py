"""Every experiment at a tiny size: it runs, writes its outputs, and its report says what it
should."""

import json

import pytest

from bnlab.lab.runner import start
from bnlab.lab.small_batch import SmallBatchConfig, mean_accuracy
from bnlab.lab.small_batch import run as legacy_small_batch

OUTPUTS = ("config.json", "run.json", "metrics.json", "metrics.csv", "summary.json", "report.md")


def _run(name, args, tmp_path):
    directory, report = start(name, args, out=tmp_path, progress=False)
    for output in OUTPUTS:
        assert (directory / output).stat().st_size > 0, output
    pngs = list(directory.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    rows = json.loads((directory / "metrics.json").read_text())
    return directory, report, rows


def test_fig1(tmp_path):
    directory, report, rows = _run("fig1", ["--steps=300", "--eval_every=30"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config["dataset"] == "digits" and config["lr_drop_at"] == 0.8
    bn = [r for r in rows if r["net"] == "bn"]
    assert [r["step"] for r in bn] == list(range(0, 301, 30))
    assert all({"p15", "p50", "p85", "test_accuracy"} <= set(r) for r in rows)
    assert all(r["p15"] <= r["p50"] <= r["p85"] for r in rows)
    s = report.summary
    assert s["final_accuracy_bn"] > 0.85 > s["final_accuracy_plain"]
    assert s["drift_plain_from_0"]["median_range"] > s["drift_bn_from_0"]["median_range"]
    text = (directory / "report.md").read_text()
    assert "BN is above the baseline at every evaluation from step 30" in text
    assert "p50 change" in text and "![Figure 1](fig1.png)" in text


def test_fig1_short_run_figure_and_wording_follow_the_numbers(tmp_path, monkeypatch):
    from bnlab.lab import fig1

    figures = []
    save = fig1.save
    monkeypatch.setattr(fig1, "save", lambda fig, path: figures.append(fig) or save(fig, path))
    directory, report, rows = _run("fig1", ["--steps=50"], tmp_path)
    s, text = report.summary, (directory / "report.md").read_text()
    # one drift row per net: from drift_from (1) the band compares the same evaluations as from 0
    assert [k for k in s if k.startswith("drift_")] == ["drift_plain_from_0", "drift_bn_from_0"]
    assert text.count("| without BN | 1 -> 50 |") == 1 and text.count("| with BN | 1 -> 50 |") == 1
    assert "long past convergence" not in text
    near_chance = [net for net in ("plain", "bn") if s[f"final_accuracy_{net}"] < 0.2]
    for net, label in (("plain", "without BN"), ("bn", "with BN")):
        assert (f"- {label}, the net is still near chance" in text) == (net in near_chance), net
    assert ("Both nets reached 90%" in text) == all(
        s[f"first_step_at_90_{net}"] is not None for net in ("plain", "bn")
    )
    (fig,) = figures
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_ylabel(), ax.get_title()
        drops = [line for line in ax.get_lines() if list(line.get_xdata()) == [40, 40]]
        assert len(drops) == 1, ax.get_title()  # lr x0.1 after step 40 = 0.8 * 50
        names = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "lr x0.1 after step 40" in names, names
        legend = ax.get_legend().get_window_extent()
        assert legend.y1 < ax.get_window_extent().y0  # below the axes: it covers no curve
    bands = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert bands[:3] == ["15th percentile", "50th (median)", "85th percentile"]


def test_lr(tmp_path):
    _, report, rows = _run("lr", ["--lrs=0.1,10", "--steps=60"], tmp_path)
    assert {(r["net"], r["lr"]) for r in rows} == {
        (n, lr) for n in ("plain", "bn") for lr in (0.1, 10.0)
    }
    assert (
        report.summary["plain"]["diverged_lrs"] == [10.0]
        and report.summary["bn"]["diverged_lrs"] == []
    )


def test_init(tmp_path):
    _, report, rows = _run("init", ["--scales=1e-4,0.1", "--steps=60", "--depth=4"], tmp_path)
    assert len(rows) == 4 and all("train_accuracy" in r for r in rows)
    last = {(r["net"], r["scale"]): r["test_accuracy"] for r in rows}
    assert last["bn", 1e-4] > last["plain", 1e-4] + 0.3  # a tiny init kills the signal without BN


def test_batch_size(tmp_path):
    _, report, rows = _run(
        "batch-size", ["--batch_sizes=2,32", "--epochs=0.5", "--min_steps=20"], tmp_path
    )
    assert {(r["norm"], r["batch_size"]) for r in rows} == {
        (n, b) for n in ("none", "bn", "ln") for b in (2, 32)
    }
    assert report.summary["bn"]["range"] > report.summary["ln"]["range"]


def test_conv(tmp_path):
    directory, report, rows = _run(
        "conv",
        ["--steps=150", "--eval_every=25", "--baseline_lrs=0.01,0.03", "--channels=4,8"],
        tmp_path,
    )
    s = report.summary
    assert s["baseline_lr"] in (0.01, 0.03) and 0 < s["target"] <= 1
    bn5 = [r for r in rows if r["job"] == "bn/x5"]
    assert bn5 and bn5[0]["lr"] == pytest.approx(5 * s["baseline_lr"])
    assert "steps to" in (directory / "report.md").read_text()


def test_sigmoid(tmp_path):
    _, report, rows = _run("sigmoid", ["--steps=300", "--depth=6", "--hidden=32"], tmp_path)
    assert report.summary["final_accuracy_bn"] > 0.8 and report.summary["plain_stalled"]
    grads = {r["net"]: r["first_layer_grad_norm"] for r in rows if r["step"] == 300}
    assert grads["bn"] > 100 * grads["plain"]  # the plain net's gradient vanished


def test_small_batch_in_the_framework_matches_the_plain_api(tmp_path):
    args = ["--batch_sizes=4,16", "--epochs=1", "--hidden=16", "--norms=bn,layernorm"]
    directory, report, rows = _run("small-batch", args, tmp_path)
    legacy = legacy_small_batch(
        SmallBatchConfig(batch_sizes=(4, 16), epochs=1, hidden=16, norms=("bn", "layernorm"))
    )
    new, old = mean_accuracy(rows), mean_accuracy(legacy)
    assert new.keys() == old.keys()
    assert all(
        new[k] == pytest.approx(old[k], abs=1e-6) for k in old
    )  # the same training as before the move
    assert "| BatchNorm |" in (directory / "report.md").read_text()
