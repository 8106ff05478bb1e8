import numpy as np
import pytest
import torch

import bnlab.data
from bnlab.data import DatasetError, digits_arrays, load_batches, load_digits
from test_mnist import tiny_mnist


def test_bundled_digits_split():
    data = load_digits(test_fraction=0.25, seed=1)
    assert data.num_features == 64 and data.num_classes == 10
    assert len(data.train_y) + len(data.test_y) == 1797
    assert len(data.test_y) == round(0.25 * 1797)
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    again = load_digits(test_fraction=0.25, seed=1)
    assert torch.equal(data.test_y, again.test_y)
    assert not torch.equal(data.test_y, load_digits(test_fraction=0.25, seed=2).test_y)


def test_bundled_digits_are_the_uci_test_set():
    pixels, labels = digits_arrays()
    assert pixels.shape == (1797, 64) and labels.shape == (1797,)
    assert pixels.min() == 0 and pixels.max() == 16  # 4x4 blocks of a 32x32 bitmap, counted
    # the class sizes of UCI's optdigits.tes
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_corrupt_bundled_digits_raise(monkeypatch):
    monkeypatch.setattr(bnlab.data, "DIGITS_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match="digits.csv.gz is corrupt"):
        load_digits()


def test_truncated_bundled_digits_raise(monkeypatch, tmp_path):
    from importlib import resources

    packed = (resources.files("bnlab") / bnlab.data.DIGITS_FILE).read_bytes()  # gzipped
    (tmp_path / "resources").mkdir()
    (tmp_path / bnlab.data.DIGITS_FILE).write_bytes(packed[: len(packed) // 2])
    monkeypatch.setattr(bnlab.data.resources, "files", lambda package: tmp_path)
    with pytest.raises(DatasetError, match="digits.csv.gz: not a readable gzip file"):
        load_digits()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


def test_load_batches_from_the_digits_in_order():
    split = load_digits()
    batches = load_batches("digits", split="train", batch_size=100, shape=(1, 8, 8))
    assert [len(x) for x, _ in batches] == [100] * 14 + [len(split.train_y) - 1400]
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(1), split.train_x)
    assert torch.equal(torch.cat([y for _, y in batches]), split.train_y)
    assert len(load_batches("digits", batch_size=64, max_batches=2)) == 2


def test_load_batches_from_an_mnist_directory(tmp_path):
    arrays = tiny_mnist(tmp_path)
    batches = load_batches(tmp_path, batch_size=3, shape=(1, 28, 28))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 1, 28, 28), (1, 1, 28, 28)]
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize("form", ["tensor", "pair", "dict"])
def test_load_batches_from_a_tensor_file(tmp_path, form):
    x, y = torch.randn(10, 4), torch.arange(10)
    content = {"tensor": x, "pair": (x, y), "dict": {"x": x, "y": y}}[form]
    torch.save(content, tmp_path / "data.pt")
    batches = load_batches(tmp_path / "data.pt", batch_size=4)
    assert torch.equal(torch.cat([b for b, _ in batches]), x)
    labels = [t for _, t in batches]
    assert labels == [None] * 3 if form == "tensor" else torch.equal(torch.cat(labels), y)


def test_load_batches_names_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="expected 'digits', an MNIST directory"):
        load_batches(tmp_path / "missing")
    torch.save((torch.randn(5, 3), torch.arange(4)), tmp_path / "bad.pt")
    with pytest.raises(DatasetError, match=r"labels must be a tensor of shape \(5,\)"):
        load_batches(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"cannot view examples of 64 values as shape \(1, 9, 9\)"):
        load_batches("digits", shape=(1, 9, 9))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_batches("digits", split="val")
