"""Datasets. The embedded default ships with the install: scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Images flattened to rows of floats in [0, 1] and integer labels."""

    train_x: Tensor  # (n_train, features)
    train_y: Tensor  # (n_train,)
    test_x: Tensor  # (n_test, features)
    test_y: Tensor  # (n_test,)

    @property
    def num_features(self) -> int:
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.train_y.max()) + 1


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 1,797 8x8 digits bundled with scikit-learn (no download), split at random by ``seed``."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sklearn_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])
