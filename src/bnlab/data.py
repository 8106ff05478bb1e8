"""Datasets: the embedded default that ships with the install (the 8x8 handwritten digits of UCI's
Optical Recognition of Handwritten Digits, E. Alpaydin and C. Kaynak, 1998, CC BY 4.0), MNIST from
its four IDX files in a directory the user names, and the sequential and permuted views the
recurrent experiments use."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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


DIGITS_FILE = "resources/digits.csv.gz"  # inside the package: 1,797 rows of 64 pixels and a label
DIGITS_SHA256 = "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"  # uncompressed


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as they are stored: pixels (1797, 64) with values 0..16, labels (1797,).

    The test set of UCI's Optical Recognition of Handwritten Digits (43 writers' 32x32 bitmaps,
    each 4x4 block counted into one 8x8 pixel), the copy scikit-learn also bundles; read here so
    that the default job needs neither a download nor scikit-learn and SciPy.
    """
    with resources.as_file(resources.files("bnlab") / DIGITS_FILE) as path:
        raw = _file_bytes(path)
    if hashlib.sha256(raw).hexdigest() != DIGITS_SHA256:
        raise DatasetError(f"bnlab's bundled {DIGITS_FILE} is corrupt (sha256 differs): reinstall")
    table = np.loadtxt(raw.decode().splitlines(), delimiter=",", dtype=np.int64)
    return table[:, :-1], table[:, -1]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 1,797 bundled 8x8 digits (no download, see :func:`digits_arrays`), pixels scaled to
    [0, 1], split at random by ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    pixels, labels = digits_arrays()
    x = torch.tensor(pixels / 16.0, dtype=torch.float32)  # pixel values are 0..16
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


# --------------------------------------------------------------------------------------------
# MNIST from its four IDX files
# --------------------------------------------------------------------------------------------

DATA_DIR_ENV = "BNLAB_DATA_DIR"
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
# name -> (IDX magic number, md5 of the uncompressed IDX bytes, whichever archive held them)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (2049, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (2051, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (2049, "27ae3e4e09519cfbb04c329615203637"),
}


class DatasetError(ValueError):
    """A dataset file is missing, truncated, corrupt or not what was expected."""


def mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$BNLAB_DATA_DIR``; an error naming both when neither is set."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise DatasetError(f"no MNIST directory: pass data_dir (--data-dir) or set ${DATA_DIR_ENV}")
    return Path(chosen)


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"{directory / name}[.gz] not found: MNIST needs the four IDX files "
        f"{sorted(MNIST_FILES)} (gzipped or raw) in {directory}"
    )


def _file_bytes(path: Path) -> bytes:
    """The bytes of a file, gunzipped where its name ends in .gz."""
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: not a readable gzip file ({error})") from error


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """An IDX file (gzipped or raw) as a uint8 array of the shape its header gives.

    IDX: a big-endian int32 magic number 0x0000TTDD (TT = 0x08: unsigned bytes, DD = the number of
    dims), DD big-endian int32 sizes, then the data.
    """
    path = Path(path)
    data = _file_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(f"{path}: magic number {magic}, expected {expected_magic}")
    if magic >> 8 != 0x08:
        raise DatasetError(f"{path}: magic number {magic:#010x} is not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes, expected {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: {len(data)} bytes, expected {expected} for shape {shape} "
            "(truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def verify_mnist(data_dir: str | os.PathLike | None = None) -> None:
    """Check the four files' IDX bytes against the published checksums."""
    directory = mnist_dir(data_dir)
    for name, (_, md5) in MNIST_FILES.items():
        path = _find(directory, name)
        digest = hashlib.md5(_file_bytes(path)).hexdigest()
        if digest != md5:
            raise DatasetError(f"{path}: md5 of its IDX bytes is {digest}, expected {md5}")


def download_mnist(data_dir: str | os.PathLike | None = None, mirrors=MNIST_MIRRORS) -> Path:
    """Fetch the missing files from the first mirror that answers, verifying each checksum."""
    directory = mnist_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for name, (_, md5) in MNIST_FILES.items():
        if (directory / f"{name}.gz").is_file() or (directory / name).is_file():
            continue
        errors = []
        for mirror in mirrors:
            try:
                with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=60) as response:
                    payload = response.read()
            except OSError as error:
                errors.append(f"{mirror}: {error}")
                continue
            digest = hashlib.md5(gzip.decompress(payload)).hexdigest()
            if digest != md5:
                errors.append(f"{mirror}: md5 {digest}, expected {md5}")
                continue
            (directory / f"{name}.gz").write_bytes(payload)
            break
        else:
            raise DatasetError(f"could not download {name}.gz: " + "; ".join(errors))
    return directory


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, download: bool = False, verify: bool = False
) -> Split:
    """MNIST from its four IDX files in ``data_dir`` (or ``$BNLAB_DATA_DIR``), pixels in [0, 1].

    Args:
        data_dir: the directory holding the files (gzipped or raw).
        download: fetch missing files from the usual mirrors first (checksums verified).
        verify: check every file against the published checksums before loading.

    Returns:
        a :class:`Split` of flattened 784-pixel rows: 60,000 train and 10,000 test.
    """
    directory = download_mnist(data_dir) if download else mnist_dir(data_dir)
    if verify:
        verify_mnist(directory)
    arrays = {
        name: read_idx(_find(directory, name), magic) for name, (magic, _) in MNIST_FILES.items()
    }
    parts = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} "
                "do not pair up (expected (n, rows, cols) and (n,))"
            )
        parts += [
            torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)),
        ]
    return Split(*parts)


def sequential(x: Tensor, mode: str = "pixel", side: int = 28) -> Tensor:
    """Flattened square images (N, side * side) as sequences: "pixel" gives (N, side^2, 1) (one
    pixel per step, the sequential-MNIST task), "row" gives (N, side, side) (one row per step)."""
    if mode == "pixel":
        return x.reshape(len(x), side * side, 1)
    if mode == "row":
        return x.reshape(len(x), side, side)
    raise ValueError(f"mode must be 'pixel' or 'row', got {mode!r}")


def permute_pixels(x: Tensor, seed: int = 0) -> Tensor:
    """The same fixed random permutation of the pixel order for every image (permuted MNIST)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(x.shape[1]))
    return x[:, order]


# --------------------------------------------------------------------------------------------
# batches for tools that take "some data": the digits, an MNIST directory, or a tensor file
# --------------------------------------------------------------------------------------------


def load_batches(
    source: str | os.PathLike,
    *,
    split: str = "test",
    batch_size: int = 128,
    max_batches: int | None = None,
    shape: tuple[int, ...] | None = None,
) -> list[tuple[Tensor, Tensor | None]]:
    """(input, labels or None) batches from ``"digits"``, an MNIST directory, or a tensor file.

    Args:
        source: ``"digits"`` (bundled), a directory with MNIST's IDX files, or a file saved with
            :func:`torch.save` holding a tensor of inputs, an ``(inputs, labels)`` pair, or a
            dict with ``"x"`` / ``"inputs"`` and optionally ``"y"`` / ``"labels"``.
        split: ``"test"`` or ``"train"`` (datasets only).
        batch_size: rows per batch (the last batch may be shorter).
        max_batches: keep the first ones only.
        shape: per-example shape to view the rows as, e.g. ``(1, 8, 8)`` for the digits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, y = _inputs_and_labels(source, split)
    if shape is not None:
        per_example = int(np.prod(shape))
        if x[0].numel() != per_example:
            raise ValueError(
                f"cannot view examples of {x[0].numel()} values as shape {tuple(shape)} "
                f"({per_example} values)"
            )
        x = x.reshape(len(x), *shape)
    batches = [
        (x[i : i + batch_size], None if y is None else y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]
    return batches[:max_batches] if max_batches is not None else batches


def _inputs_and_labels(source, split: str) -> tuple[Tensor, Tensor | None]:
    if str(source) == "digits":
        data = load_digits()
    elif Path(source).is_dir():
        data = load_mnist(source)
    elif Path(source).is_file():
        return _tensor_file(Path(source))
    else:
        raise DatasetError(
            f"data source {str(source)!r}: expected 'digits', an MNIST directory or a tensor file"
        )
    return (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)


def _tensor_file(path: Path) -> tuple[Tensor, Tensor | None]:
    content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, dict):
        x = content.get("x", content.get("inputs"))
        y = content.get("y", content.get("labels"))
    elif isinstance(content, (tuple, list)) and len(content) == 2:
        x, y = content
    else:
        x, y = content, None
    if not isinstance(x, Tensor) or x.ndim < 1 or len(x) == 0:
        raise DatasetError(
            f"{path}: expected a tensor of inputs, an (inputs, labels) pair or a dict with 'x' "
            f"(and 'y'), got {type(content).__name__}"
        )
    if y is not None and (not isinstance(y, Tensor) or y.shape != (len(x),)):
        raise DatasetError(f"{path}: labels must be a tensor of shape ({len(x)},)")
    return x, y
