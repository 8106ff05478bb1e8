import json

import pytest

from bnlab.lab.small_batch import NORMS, SmallBatchConfig, mean_accuracy, run, write_outputs


def test_tiny_sweep_writes_every_output(tmp_path):
    config = SmallBatchConfig(batch_sizes=(4, 16), epochs=1, hidden=16)
    rows = run(config)
    assert {(r["norm"], r["batch_size"]) for r in rows} == {(k, b) for k in NORMS for b in (4, 16)}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    report = write_outputs(rows, config, tmp_path)
    for name in ("config.json", "metrics.csv", "metrics.json", "accuracy.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["batch_sizes"] == [4, 16]
    text = report.read_text()
    means = mean_accuracy(rows)
    assert f"| BatchNorm | {100 * means['bn', 4]:.1f} | {100 * means['bn', 16]:.1f} |" in text
    assert "BatchNorm: " in text and "at batch 4" in text


def test_bn_breaks_at_batch_two_where_layer_norm_does_not():
    """The claim of the committed report, at one seed and a quarter of its epochs."""
    config = SmallBatchConfig(batch_sizes=(2,), norms=("bn", "layernorm"), epochs=2)
    means = mean_accuracy(run(config))
    assert means["layernorm", 2] > means["bn", 2] + 0.15


def test_unknown_norm_fails_before_training():
    with pytest.raises(ValueError, match="unknown normalization"):
        run(SmallBatchConfig(norms=("bn", "weightnorm")))
