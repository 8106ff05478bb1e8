"""MNIST from IDX files: tiny files made here, every failure a clear error naming the file."""

import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from bnlab import data
from bnlab.data import DatasetError, load_mnist, permute_pixels, read_idx, sequential


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_mnist(directory, n_train=6, n_test=4, gz=True, side=28):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_loads_gzipped_or_raw(tmp_path, gz):
    arrays = tiny_mnist(tmp_path, gz=gz)
    split = load_mnist(tmp_path)
    assert split.train_x.shape == (6, 784) and split.test_x.shape == (4, 784)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(6, -1) / 255.0).float()
    torch.testing.assert_close(split.train_x, expected)
    assert split.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_directory_from_environment(tmp_path, monkeypatch):
    tiny_mnist(tmp_path)
    monkeypatch.setenv("BNLAB_DATA_DIR", str(tmp_path))
    assert len(load_mnist().train_y) == 6
    monkeypatch.delenv("BNLAB_DATA_DIR")
    with pytest.raises(DatasetError, match="BNLAB_DATA_DIR"):
        load_mnist()


def test_missing_file_is_named(tmp_path):
    tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.*not found"):
        load_mnist(tmp_path)


def test_truncated_file(tmp_path):
    tiny_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte: \d+ bytes, expected \d+ .*truncated"
    ):
        load_mnist(tmp_path)


def test_corrupt_gzip(tmp_path):
    tiny_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08 not gzip at all")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: not a readable gzip"):
        load_mnist(tmp_path)


def test_wrong_magic_number(tmp_path):
    tiny_mnist(tmp_path, gz=False)
    labels = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)  # a labels file where images belong
    with pytest.raises(
        DatasetError, match="train-images-idx3-ubyte: magic number 2049, expected 2051"
    ):
        load_mnist(tmp_path)


def test_images_and_labels_must_pair(tmp_path):
    tiny_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5))))
    with pytest.raises(DatasetError, match="do not pair up"):
        load_mnist(tmp_path)


def test_checksum_verification(tmp_path):
    tiny_mnist(tmp_path)
    with pytest.raises(
        DatasetError, match=r"md5 of its IDX bytes is [0-9a-f]{32}, expected 6bbc9ace"
    ):
        load_mnist(tmp_path, verify=True)


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(np.arange(24).reshape(2, 3, 4)))
    assert read_idx(path).shape == (2, 3, 4)
    assert read_idx(path)[1, 2, 3] == 23


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server holding tiny MNIST files, and checksums that match them."""
    served = tmp_path / "served"
    served.mkdir()
    arrays = tiny_mnist(served)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = {
        name: (magic, hashlib.md5(idx_bytes(arrays[name])).hexdigest())
        for name, (magic, _) in data.MNIST_FILES.items()
    }
    yield f"http://127.0.0.1:{server.server_address[1]}/", files
    server.shutdown()


def test_download_verifies_and_falls_back_to_the_next_mirror(tmp_path, mirror, monkeypatch):
    url, files = mirror
    monkeypatch.setattr(data, "MNIST_FILES", files)
    target = tmp_path / "mnist"
    data.download_mnist(target, mirrors=("http://127.0.0.1:9/", url))  # port 9: refused at once
    assert len(load_mnist(target, verify=True).train_y) == 6


def test_download_rejects_a_bad_checksum(tmp_path, mirror):
    url, _ = mirror  # the real MNIST checksums: the tiny files do not match them
    with pytest.raises(DatasetError, match=r"could not download train-images-idx3-ubyte.gz: .*md5"):
        data.download_mnist(tmp_path / "mnist", mirrors=(url,))


def test_sequential_and_permuted_views():
    x = torch.arange(2 * 784, dtype=torch.float32).reshape(2, 784)
    assert sequential(x, "pixel").shape == (2, 784, 1)
    rows = sequential(x, "row")
    assert rows.shape == (2, 28, 28) and torch.equal(rows[1, 3], x[1, 84:112])
    p1, p2 = permute_pixels(x, seed=1), permute_pixels(x, seed=1)
    assert torch.equal(p1, p2) and not torch.equal(p1, x)
    assert torch.equal(p1.sort(dim=1).values, x)  # a permutation, the same for every image
    assert torch.equal(p1[1] - p1[0], torch.full((784,), 784.0))
    with pytest.raises(ValueError, match="'pixel' or 'row'"):
        sequential(x, "column")
