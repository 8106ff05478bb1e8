import re

from click.testing import CliRunner

from bnlab.cli import main


def test_demo_prints_both_accuracies():
    result = CliRunner().invoke(main, ["demo", "--steps", "50"])
    assert result.exit_code == 0, result.output
    accuracies = re.findall(r"(without BN|with BN)\s*: test accuracy (\d\.\d{4})", result.output)
    assert [label for label, _ in accuracies] == ["without BN", "with BN"]
    assert all(0.0 <= float(acc) <= 1.0 for _, acc in accuracies)


def test_demo_rejects_bad_options():
    result = CliRunner().invoke(main, ["demo", "--lr", "-1"])
    assert result.exit_code != 0 and "--lr" in result.output


def test_precise_bn_recovers_from_lagging_running_statistics():
    result = CliRunner().invoke(main, ["precise-bn", "--steps", "300", "--batches", "20"])
    assert result.exit_code == 0, result.output
    before = float(re.search(r"running \(EMA\) statistics: (\d\.\d+)", result.output).group(1))
    after = float(re.search(r"population statistics over 20 batches: (\d\.\d+)", result.output).group(1))
    assert after > 0.85 and after > before + 0.3
