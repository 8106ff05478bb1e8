import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from bnlab.lab.config import (
    ConfigError,
    apply_overrides,
    describe,
    field_docs,
    from_dict,
    parse_overrides,
    to_dict,
)
from bnlab.lab.runner import all_experiments, get_experiment


@dataclass
class Demo:
    steps: int = 100  # how long
    lr: float = 0.5  # the rate
    name: str = "x"
    fast: bool = False  # a flag
    dataset: Literal["digits", "mnist"] = "digits"
    data_dir: Optional[str] = None  # where
    limit: Optional[int] = None
    sizes: tuple[int, ...] = (2, 4)  # a list


def test_overrides_are_converted_to_the_field_types():
    c = apply_overrides(
        Demo(),
        [
            "--steps=5e3",
            "--lr=1",
            "--fast=yes",
            "--dataset=mnist",
            "--data-dir",
            "/d",
            "--limit=none",
            "--sizes=8,16,32",
            "--name=7",
        ],
    )
    assert c == Demo(
        steps=5000,
        lr=1.0,
        name="7",
        fast=True,
        dataset="mnist",
        data_dir="/d",
        limit=None,
        sizes=(8, 16, 32),
    )
    assert isinstance(c.lr, float)
    assert apply_overrides(Demo(), ["--fast"]).fast is True
    assert apply_overrides(Demo(fast=True), ["--no-fast"]).fast is False
    assert apply_overrides(Demo(), ["--limit=3"]).limit == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--stepz=3"],
            r"unknown key 'stepz' for experiment 'demo' \(did you mean steps\?\); "
            r"valid keys: steps, lr, name",
        ),
        (["--steps=1.5"], "--steps: expected an int"),
        (["--lr=fast"], "--lr: expected a float"),
        (["--fast=maybe"], "expected a bool"),
        (["--dataset=cifar"], "expected one of digits, mnist"),
        (["--sizes=2,x"], "expected an int"),
        (["--steps=1", "--steps=2"], "given twice"),
        (["steps=3"], "expected --key=value"),
        (["--steps"], "needs a value"),
    ],
)
def test_bad_overrides_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(Demo, args, "demo")


def test_dict_overrides_are_type_checked():
    assert apply_overrides(Demo(), {"sizes": [1, 2], "lr": 2}).sizes == (1, 2)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        apply_overrides(Demo(), {"bogus": 1})
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(Demo(), {"steps": "many"})
    assert from_dict(Demo, to_dict(Demo(sizes=(3,)))) == Demo(sizes=(3,))


def test_field_comments_are_the_documentation():
    docs = field_docs(Demo)
    assert docs["steps"] == "how long" and docs["sizes"] == "a list" and "name" not in docs
    rows = {key: (type_, default, doc) for key, type_, default, doc in describe(Demo)}
    assert rows["sizes"] == ("tuple[int, ...]", "2,4", "a list")
    assert rows["data_dir"][0] == "str or none"


def test_every_experiment_documents_every_key_and_resolves_its_defaults():
    for name in ("fig1", "lr", "init", "batch-size", "conv", "sigmoid", "small-batch"):
        exp = get_experiment(name)
        missing = [key for key, _, _, doc in describe(exp.config) if not doc]
        assert not missing, f"{name}: undocumented keys {missing}"
        config = exp.make_config([])
        assert all(
            v is not None for k, v in vars(config).items() if k not in ("data_dir", "init_std")
        ), name
    fig1 = get_experiment("fig1")
    assert fig1.make_config([]).steps < fig1.make_config(["--dataset=mnist"]).steps == 50_000
    with pytest.raises(ConfigError, match="steps must be > 0"):
        fig1.make_config(["--steps=0"])
    with pytest.raises(ConfigError, match="unknown experiment 'fig2' \\(did you mean fig1\\?\\)"):
        get_experiment("fig2")


def test_a_data_dir_selects_mnist_in_every_experiment_that_reads_one(tmp_path):
    with_data_dir = [
        exp
        for exp in all_experiments().values()
        if {"dataset", "data_dir"} <= {f.name for f in dataclasses.fields(exp.config)}
    ]
    assert len(with_data_dir) >= 9  # fig1, lr, init, batch-size, conv, sigmoid, small-batch, ...
    for exp in with_data_dir:
        assert exp.make_config([]).dataset == "digits", exp.name
        assert exp.make_config([f"--data_dir={tmp_path}"]).dataset == "mnist", exp.name
        assert exp.make_config({"data_dir": str(tmp_path)}).dataset == "mnist", exp.name
        given = exp.make_config(["--dataset=mnist", f"--data-dir={tmp_path}"])
        assert (given.dataset, given.data_dir) == ("mnist", str(tmp_path)), exp.name
        assert exp.make_config(["--data_dir=none"]).dataset == "digits", exp.name
        with pytest.raises(ConfigError, match=f"{exp.name}: data_dir=.* but dataset is 'digits'"):
            exp.make_config(["--dataset=digits", f"--data_dir={tmp_path}"])
