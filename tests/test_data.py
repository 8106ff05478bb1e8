import pytest
import torch

from bnlab.data import load_digits


def test_bundled_digits_split():
    data = load_digits(test_fraction=0.25, seed=1)
    assert data.num_features == 64 and data.num_classes == 10
    assert len(data.train_y) + len(data.test_y) == 1797
    assert len(data.test_y) == round(0.25 * 1797)
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    again = load_digits(test_fraction=0.25, seed=1)
    assert torch.equal(data.test_y, again.test_y)
    assert not torch.equal(data.test_y, load_digits(test_fraction=0.25, seed=2).test_y)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)
