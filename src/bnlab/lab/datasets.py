"""The lab's datasets: loading (once per process) and the config defaults that depend on them.

Both the runner (which loads a run's dataset before creating its directory, so a missing or corrupt
dataset fails early) and the experiments need these; this module imports neither of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import Tensor

from ..data import Split, load_digits, load_mnist

Dataset = Literal["digits", "mnist"]
DATASETS = ("digits", "mnist")

_DATA_CACHE: dict[tuple, Split] = {}


@dataclass
class DatasetConfig:
    """The first two fields of the configs of the experiments on the digits or MNIST."""

    dataset: Dataset = "digits"  # digits: the bundled 8x8 digits; mnist: IDX files in data_dir
    data_dir: Optional[str] = None  # MNIST directory; None: $BNLAB_DATA_DIR


def load_data(dataset: str, data_dir: Optional[str] = None) -> Split:
    """``digits``: scikit-learn's bundled 8x8 digits (1,437 train / 360 test, split with seed 0);
    ``mnist``: the IDX files in ``data_dir`` or ``$BNLAB_DATA_DIR`` (60,000 / 10,000)."""
    key = (dataset, data_dir)
    if key not in _DATA_CACHE:
        if dataset == "digits":
            _DATA_CACHE[key] = load_digits()
        elif dataset == "mnist":
            _DATA_CACHE[key] = load_mnist(data_dir)
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
