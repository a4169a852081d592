"""Tiny datasets written in the real on-disk formats (gzipped idx, CIFAR pickles, PNG trees).

Images carry their identity in pixels so tests can check which rows went where: in the idx fixture,
pixel (0, 0) of every image is its row number and pixel (0, 1) is 0 for train and 1 for test.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
IDX_CODES |= {np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}

N_TRAIN, N_TEST, N_CLASSES = 200, 50, 10


def write_idx_file(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` as an idx file: magic (0, 0, type, rank), big-endian dims, big-endian data."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, IDX_CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + big.tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.fixture
def write_idx() -> Callable[..., None]:
    return write_idx_file


def make_idx_images(n: int, is_test: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = int(is_test)
    return images


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST-format folder with 200 train and 50 test images, classes cycling 0..9."""
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    write_idx_file(root / "train-images-idx3-ubyte.gz", make_idx_images(N_TRAIN, False, 0))
    write_idx_file(root / "train-labels-idx1-ubyte.gz", (np.arange(N_TRAIN) % N_CLASSES).astype(np.uint8))
    write_idx_file(root / "t10k-images-idx3-ubyte.gz", make_idx_images(N_TEST, True, 1))
    write_idx_file(root / "t10k-labels-idx1-ubyte.gz", (np.arange(N_TEST) % N_CLASSES).astype(np.uint8))
    return root


def write_pickle_file(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the original Python 2 files


@pytest.fixture
def write_pickle() -> Callable[[Path, object], None]:
    return write_pickle_file


@pytest.fixture
def write_png() -> Callable[..., None]:
    """``write_png(path, value, (width, height), mode="RGB")``: a constant-colour PNG."""
    return write_png_file


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """``tmp/cifar-10-batches-py`` with 5 train batches of 8 images and a test batch of 10."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(8, 3072), dtype=np.uint8)
        labels = [(8 * (i - 1) + j) % 10 for j in range(8)]
        write_pickle_file(root / f"data_batch_{i}", {b"batch_label": b"x", b"data": data, b"labels": labels})
    test = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
    write_pickle_file(root / "test_batch", {b"data": test, b"labels": list(range(10))})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle_file(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return root


def write_png_file(path: Path, value: int, size: tuple[int, int], mode: str = "RGB") -> None:
    channels = 1 if mode == "L" else 3
    array = np.full((size[1], size[0], channels), value, dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode).save(path)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three classes (written unsorted) x 5 constant-colour PNGs of varying sizes; value = 10*class+i."""
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "ant", "dog"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(5):
            write_png_file(folder / f"img{i}.png", 10 * c + i, (20 + i, 16))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root
