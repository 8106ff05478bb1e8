"""seq-mnist, pmnist and grad-flow at a tiny size on the bundled digits (8x8: 8 rows, 64 pixels)."""

import json

import pytest
import torch
from torch import nn

from bnlab.lab.config import ConfigError
from bnlab.lab.runner import start
from bnlab.lab.seq_mnist import ClippedRMSprop, SequenceClassifier, paper_init_


def _run(name, args, tmp_path):
    directory, report = start(name, args, out=tmp_path, progress=False)
    for output in ("config.json", "metrics.json", "metrics.csv", "summary.json", "report.md"):
        assert (directory / output).stat().st_size > 0, output
    assert all(p.stat().st_size > 1000 for p in directory.glob("*.png"))
    return directory, report, json.loads((directory / "metrics.json").read_text())


def test_seq_mnist_row_by_row(tmp_path):
    directory, report, rows = _run(
        "seq-mnist", ["--steps=150", "--eval_every=50", "--hidden=32"], tmp_path
    )
    config = json.loads((directory / "config.json").read_text())
    assert config["mode"] == "row" and config["permute"] is False and config["valid_size"] == 200
    for model in ("lstm", "bnlstm"):
        mine = [r for r in rows if r["model"] == model]
        assert [r["step"] for r in mine] == [0, 50, 100, 150]
        assert all(0 <= r["valid_accuracy"] <= 1 for r in mine)
        # the BN-LSTM: population statistics for the curve, the running averages beside it
        assert all(("test_accuracy_running" in r) == (model == "bnlstm") for r in mine)
        assert all(("test_accuracy_algorithm2" in r) == (model == "bnlstm") for r in mine)
    s = report.summary
    assert s["bnlstm"]["final_test_accuracy"] > 0.5  # 8 steps of 8 pixels: learnable in 150 steps
    assert s["bnlstm"]["final_test_accuracy"] == rows[-1]["test_accuracy"]
    text = (directory / "report.md").read_text()
    assert "row-by-row digits" in text and "![accuracy](accuracy.png)" in text
    assert config["population_joint"] is True  # row mode: the population batches run as one batch
    assert "per-time-step population statistics of 5,000 training images" in text
    assert (
        "BN-LSTM ahead of the LSTM (test accuracy) at" in text
        and (directory / "accuracy.png").exists()
    )


def test_pmnist_pixel_by_pixel(tmp_path):
    directory, report, rows = _run(
        "pmnist",
        ["--steps=6", "--eval_every=3", "--hidden=8", "--eval_examples=40", "--batch_size=16"],
        tmp_path,
    )
    config = json.loads((directory / "config.json").read_text())
    assert config["mode"] == "pixel" and config["permute"] is True
    assert {(r["model"], r["step"]) for r in rows} == {
        (m, s) for m in ("lstm", "bnlstm") for s in (0, 3, 6)
    }
    assert "permuted pixel-by-pixel digits" in (directory / "report.md").read_text()


def test_population_statistics_restore_the_running_averages(tmp_path):
    """Evaluating with population statistics leaves training's running averages as they were:
    the BN-LSTM's rows are the same whether or not the evaluations in between used them."""
    args = ["--steps=40", "--eval_every=20", "--hidden=8", "--models=bnlstm"]
    _, _, with_pop = _run("seq-mnist", args, tmp_path / "a")
    _, _, without = _run("seq-mnist", args + ["--population_batches=0"], tmp_path / "b")
    assert [r["train_loss"] for r in with_pop] == [r["train_loss"] for r in without]
    assert [r["test_accuracy_running"] for r in with_pop] == [r["test_accuracy"] for r in without]


def test_population_joint_option(tmp_path):
    """Row mode runs the population batches as one batch by default, pixel mode averages per-batch
    statistics (Algorithm 2); --population_joint picks either, and the report says which."""
    args = ["--steps=20", "--eval_every=20", "--hidden=8", "--models=bnlstm"]
    directory, _, rows = _run("seq-mnist", args + ["--population_joint=false"], tmp_path / "a")
    assert json.loads((directory / "config.json").read_text())["population_joint"] is False
    assert not any(
        "test_accuracy_algorithm2" in r for r in rows
    )  # the curve is Algorithm 2's itself
    assert (
        "Algorithm 2's population statistics, per time step, over 50 training batches"
        in (directory / "report.md").read_text()
    )
    directory, _, _ = _run(
        "pmnist",
        [
            "--steps=3",
            "--eval_every=3",
            "--hidden=8",
            "--eval_examples=20",
            "--batch_size=16",
            "--models=bnlstm",
            "--population_batches=2",
        ],
        tmp_path / "b",
    )
    assert json.loads((directory / "config.json").read_text())["population_joint"] is False
    directory, _, _ = _run(
        "pmnist",
        [
            "--steps=3",
            "--eval_every=3",
            "--hidden=8",
            "--eval_examples=20",
            "--batch_size=16",
            "--models=bnlstm",
            "--population_batches=2",
            "--population_joint=true",
        ],
        tmp_path / "c",
    )
    assert "run through the net as one batch" in (directory / "report.md").read_text()


def test_bad_configs_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="permute needs mode=pixel"):
        start("seq-mnist", ["--permute=true"], out=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="models must be some of"):
        start("seq-mnist", ["--models=gru"], out=tmp_path, progress=False)


def test_grad_flow_run(tmp_path):
    directory, report, rows = _run(
        "grad-flow", ["--batches=2", "--hidden=16", "--batch_size=32"], tmp_path
    )
    jobs = {"rnn/gamma=0.1", "rnn/gamma=1", "bnlstm/gamma=0.1", "bnlstm/gamma=1", "lstm"}
    assert {r["job"] for r in rows} == jobs
    s = report.summary
    first = s["first_step"]
    assert 1 < first < 64  # the top-left pixels of the digits are blank in every image
    assert sorted(r["t"] for r in rows if r["job"] == "lstm")[-1] == 64
    for key in jobs:  # the table's ratio is the rows' own
        by_t = {r["t"]: r["grad_norm"] for r in rows if r["job"] == key}
        assert s[key]["first_over_last"] == pytest.approx(by_t[first] / by_t[64])
    assert "![gradient flow](grad_flow.png)" in (directory / "report.md").read_text()


def test_bn_rnn_gradient_vanishes_with_gamma_one():
    """The claim of the committed figure, on 300 steps of uniform noise: back from h_T, the
    gradient of a BN tanh RNN survives with gamma 0.1 and vanishes with gamma 1."""
    from bnlab.lab.grad_flow import BNTanhRNN, hidden_state_gradients

    g = torch.Generator().manual_seed(0)
    seq, y = torch.rand(300, 32, 1, generator=g), torch.randint(10, (32,), generator=g)
    first = {}
    for gamma in (0.1, 1.0):
        torch.manual_seed(0)
        norms = hidden_state_gradients("rnn", BNTanhRNN(1, 100, gamma), nn.Linear(100, 10), seq, y)
        assert torch.isfinite(norms).all() and norms[-1] > 0.01
        first[gamma] = float(norms[0])
    assert first[0.1] > 1e-2 and first[1.0] < 1e-4 * first[0.1]


def test_first_varying_step():
    from bnlab.lab.grad_flow import first_varying_step

    seq = torch.zeros(5, 3, 2)
    assert first_varying_step(seq) == 5
    seq[2, 1, 0] = 1.0
    assert first_varying_step(seq) == 2
    seq[1] = 7.0  # the same in every sequence: not varying
    assert first_varying_step(seq) == 2


@pytest.mark.parametrize("kind", ["lstm", "bnlstm"])
def test_eval_in_chunks_equals_one_batch(kind):
    torch.manual_seed(0)
    model = SequenceClassifier(kind, "row", 8, 6, 10, eval_chunk=7)
    model(torch.rand(20, 64))  # some running statistics
    model.eval()
    x = torch.rand(23, 64)
    chunked = model(x)
    model.eval_chunk = 100
    torch.testing.assert_close(chunked, model(x))


def test_paper_init_and_clipping():
    lstm = paper_init_(nn.LSTM(3, 4))
    assert torch.equal(lstm.weight_hh_l0, torch.eye(4).repeat(4, 1))
    w = lstm.weight_ih_l0
    torch.testing.assert_close(w.t() @ w, torch.eye(3))
    assert lstm.bias_ih_l0.abs().sum() == 0 == lstm.bias_hh_l0.abs().sum()
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([30.0, 40.0, 0.0])
    ClippedRMSprop([a], clip=1.0, lr=0.1).step()
    b.grad = b.grad / 50  # norm 50 -> 1
    torch.optim.RMSprop([b], lr=0.1).step()
    torch.testing.assert_close(a, b)
