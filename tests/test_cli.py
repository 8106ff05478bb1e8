import json
import re
from pathlib import Path

from click.testing import CliRunner

from bnlab.cli import main


def test_demo_prints_both_accuracies(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--steps", "50", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    accuracies = re.findall(r"(without BN|with BN)\s*: test accuracy (\d\.\d{4})", result.output)
    assert [label for label, _ in accuracies] == ["without BN", "with BN"]
    assert all(0.0 <= float(acc) <= 1.0 for _, acc in accuracies)
    report = Path(re.search(r"report: (\S+)", result.output).group(1))
    assert report.parent.parent == tmp_path / "fig1" and "Figure 1" in report.read_text()
    assert (report.parent / "fig1.png").stat().st_size > 0


def test_demo_rejects_bad_options():
    result = CliRunner().invoke(main, ["demo", "--lr", "-1"])
    assert result.exit_code != 0 and "--lr" in result.output


def test_precise_bn_recovers_from_lagging_running_statistics():
    result = CliRunner().invoke(main, ["precise-bn", "--steps", "300", "--batches", "20"])
    assert result.exit_code == 0, result.output
    before = float(re.search(r"running \(EMA\) statistics: (\d\.\d+)", result.output).group(1))
    after = float(
        re.search(r"population statistics over 20 batches: (\d\.\d+)", result.output).group(1)
    )
    assert after > 0.85 and after > before + 0.3


def test_list_names_every_experiment():
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names[:7] == ["fig1", "lr", "init", "batch-size", "conv", "sigmoid", "small-batch"]


def test_run_help_lists_the_keys_with_their_comments():
    result = CliRunner().invoke(main, ["run", "fig1", "--help"])
    assert result.exit_code == 0, result.output
    assert "--batch_size=60" in result.output and "the paper's mini-batch" in result.output
    assert "[NAME] [OVERRIDES]..." in CliRunner().invoke(main, ["run", "--help"]).output


def test_run_rejects_unknown_keys_and_bad_values_before_training(tmp_path):
    result = CliRunner().invoke(main, ["run", "fig1", "--stepz=3", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert (
        "unknown key 'stepz'" in result.output
        and "valid keys: dataset, data_dir, steps" in result.output
    )
    result = CliRunner().invoke(main, ["run", "fig1", "--steps=many", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--steps: expected an int" in result.output
    result = CliRunner().invoke(main, ["run", "nope"])
    assert result.exit_code != 0 and "unknown experiment 'nope'" in result.output
    result = CliRunner().invoke(
        main,
        [
            "run",
            "fig1",
            "--dataset=mnist",
            "--data_dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "not found" in result.output
    assert not (
        tmp_path / "fig1"
    ).exists()  # nothing written before the config and the data are good


def test_run_then_resume_then_report(tmp_path):
    args = [
        "run",
        "sigmoid",
        "--steps=40",
        "--depth=2",
        "--hidden=8",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    directory = Path(re.search(r"report: (\S+)", result.output).group(1)).parent
    metrics = (directory / "metrics.json").read_text()
    resumed = CliRunner().invoke(main, ["run", "--resume", str(directory), "--quiet"])
    assert resumed.exit_code == 0, (
        resumed.output
    )  # a finished run: every job skipped, outputs rewritten
    assert (directory / "metrics.json").read_text() == metrics
    (directory / "report.md").unlink()
    reported = CliRunner().invoke(main, ["report", str(directory)])
    assert reported.exit_code == 0, reported.output
    assert "deep sigmoid MLP" in (directory / "report.md").read_text()
    assert json.loads((directory / "run.json").read_text())["resumed"] == 1
    bad = CliRunner().invoke(main, ["run", "sigmoid", "--resume", str(directory)])
    assert bad.exit_code != 0 and "takes no experiment name" in bad.output


def test_small_batch_alias(tmp_path):
    result = CliRunner().invoke(
        main,
        ["small-batch", "--batch-sizes", "4", "--epochs", "1", "--out", str(tmp_path), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert "| BatchNorm |" in result.output and (tmp_path / "small-batch").is_dir()
