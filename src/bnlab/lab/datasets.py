"""The lab's datasets: loading (once per process) and the config defaults that depend on them.

Both the runner (which loads a run's dataset before creating its directory, so a missing or corrupt
dataset fails early) and the experiments need these; this module imports neither of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

from torch import Tensor

from ..data import DATA_DIR_ENV, DatasetError, Split, load_digits, load_mnist, mnist_dir
from .config import ConfigError

Dataset = Literal["digits", "mnist"]
DATASETS = ("digits", "mnist")

_DATA_CACHE: dict[tuple, Split] = {}


@dataclass
class DatasetConfig:
    """The first two fields of the configs of the experiments on the digits or MNIST."""

    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory (selects mnist); None: $BNLAB_DATA_DIR


def choose_dataset(config_cls: type, overrides: Mapping[str, Any], experiment: str = "") -> dict:
    """The overrides with the dataset that a given ``data_dir`` selects.

    ``data_dir`` names a directory of MNIST IDX files, so giving it without a dataset selects
    ``mnist`` (rather than quietly training on the default digits); giving it together with another
    dataset is a :class:`ConfigError`. Configs without both fields are returned unchanged.
    """
    values = dict(overrides)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if not {"dataset", "data_dir"} <= fields or values.get("data_dir") is None:
        return values
    dataset = values.setdefault("dataset", "mnist")
    if dataset != "mnist":
        where = f"{experiment}: " if experiment else ""
        raise ConfigError(
            f"{where}data_dir={values['data_dir']!r} names an MNIST directory, but dataset is "
            f"{dataset!r}, which reads no files: drop data_dir to train on {dataset}, or give "
            "dataset=mnist (or no dataset: a data_dir alone selects mnist)"
        )
    return values


def load_data(dataset: str, data_dir: Optional[str] = None) -> Split:
    """``digits``: bnlab's bundled 8x8 digits (1,438 train / 359 test, split with seed 0);
    ``mnist``: the IDX files in ``data_dir`` or ``$BNLAB_DATA_DIR`` (60,000 / 10,000)."""
    key = (dataset, data_dir)
    if key not in _DATA_CACHE:
        if dataset == "digits":
            _DATA_CACHE[key] = load_digits()
        elif dataset == "mnist":
            directory = mnist_dir(data_dir)
            if not directory.is_dir():  # before the per-file messages, which would list four
                raise DatasetError(
                    f"MNIST directory {directory} does not exist: data_dir (or ${DATA_DIR_ENV}) "
                    "must name the directory holding MNIST's four IDX files"
                )
            _DATA_CACHE[key] = load_mnist(directory)
        else:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return _DATA_CACHE[key]


def by_dataset(value: Any, dataset: str, digits: Any, mnist: Any) -> Any:
    """A field's resolved value: itself if set, else the dataset's default."""
    if value is not None:
        return value
    return mnist if dataset == "mnist" else digits


def images(x: Tensor) -> Tensor:
    """Flattened square images (N, side^2) as (N, 1, side, side)."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"{x.shape[1]} features are not a square image")
    return x.reshape(len(x), 1, side, side)
