import json
import re
from pathlib import Path

from click.testing import CliRunner

from bnlab.cli import main
from test_mnist import tiny_mnist


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
    assert result.exit_code != 0 and "does not exist" in result.output
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


def _config_of_the_run(out: Path, name: str) -> dict:
    (directory,) = (out / name).iterdir()
    return json.loads((directory / "config.json").read_text())


def test_a_data_dir_alone_trains_on_mnist(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    tiny_mnist(data, n_train=30, n_test=10)  # gzipped IDX files, 28x28
    tiny = ["--steps=4", "--eval_every=2", "--quiet"]
    result = CliRunner().invoke(
        main, ["run", "fig1", f"--data_dir={data}", "--out", tmp_path, *tiny]
    )
    assert result.exit_code == 0, result.output
    assert "Dataset **mnist**" in result.output
    config = _config_of_the_run(tmp_path, "fig1")
    assert (config["dataset"], config["data_dir"]) == ("mnist", str(data))
    demo = ["demo", "--data-dir", str(data), "--steps", "4", "--out", tmp_path / "demo", "--quiet"]
    result = CliRunner().invoke(main, demo)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("mnist: 4 steps")
    assert _config_of_the_run(tmp_path / "demo", "fig1")["dataset"] == "mnist"


def test_a_data_dir_with_another_dataset_or_without_mnist_files_stops(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    tiny_mnist(data)
    for args in (
        ["run", "fig1", "--dataset=digits", f"--data_dir={data}"],
        ["demo", "--dataset", "digits", "--data-dir", str(data)],
    ):
        result = CliRunner().invoke(main, [*args, "--out", tmp_path / "runs"])
        assert result.exit_code != 0
        assert f"data_dir='{data}' names an MNIST directory, but dataset is 'digits'" in (
            result.output
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["run", "conv", f"--data_dir={empty}", "--out", tmp_path])
    assert result.exit_code != 0 and "train-images-idx3-ubyte[.gz] not found" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "conv").exists()


def test_the_readme_names_every_extra():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    readme = (root / "README.md").read_text()
    missing = [name for name in extras["optional-dependencies"] if f"`bnlab[{name}]`" not in readme]
    assert not missing, f"README.md does not name the extras {missing}"
