"""The idx parser and the Fashion-MNIST reader, on idx files written here and on the real package."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hap import data
from hap.data.fashion_mnist import DEFAULT_ROOT, ENV_VAR, load_fashion_mnist, read_idx


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path: Path, write_idx: Callable[..., None], dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "u1" else np.arange(24, dtype="u1")
    write_idx(tmp_path / "a.gz", array)
    out = read_idx(tmp_path / "a.gz")
    np.testing.assert_array_equal(out.numpy(), array)
    assert tuple(out.shape) == array.shape


def test_read_idx_uncompressed(tmp_path: Path, write_idx: Callable[..., None]) -> None:
    write_idx(tmp_path / "plain-idx1-ubyte", np.array([3, 1, 2], dtype=np.uint8), compress=False)
    assert read_idx(tmp_path / "plain-idx1-ubyte").tolist() == [3, 1, 2]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "type code"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x07", "payload"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "bad.gz" in str(info.value)


def test_read_idx_rejects_non_gzip(tmp_path: Path) -> None:
    path = tmp_path / "fake.gz"
    path.write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match="fake.gz"):
        read_idx(path)


def test_load_fashion_mnist_fixture(fmnist_dir: Path) -> None:
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(fmnist_dir)
    assert train_x.shape == (200, 1, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (50, 1, 28, 28)
    assert train_y.dtype == torch.int64 and train_y.tolist() == [i % 10 for i in range(200)]
    assert torch.all(train_x[:, 0, 0, 1] == 0) and torch.all(test_x[:, 0, 0, 1] == 1)


def test_missing_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message


def test_missing_file_is_named(fmnist_dir: Path) -> None:
    (fmnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(fmnist_dir)


def test_count_mismatch_is_an_error(fmnist_dir: Path, write_idx: Callable[..., None]) -> None:
    write_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", np.zeros(199, dtype=np.uint8))
    with pytest.raises(ValueError, match="200 images but"):
        load_fashion_mnist(fmnist_dir)


def test_images_and_labels_swapped_is_an_error(fmnist_dir: Path) -> None:
    images = fmnist_dir / "train-images-idx3-ubyte.gz"
    labels = fmnist_dir / "train-labels-idx1-ubyte.gz"
    tmp = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(tmp)
    with pytest.raises(ValueError, match="rank 3"):
        load_fashion_mnist(fmnist_dir)


def test_env_var_overrides_default_root(fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(fmnist_dir))
    ds = data.load("fashion-mnist", val_fraction=0.1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (180, 20, 50)
    assert ds.in_channels == 1 and ds.num_classes == 10 and ds.image_size == (28, 28)
    assert ds.class_names[0] == "T-shirt/top"


def test_missing_env_folder_raises_file_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load("fashion-mnist")


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist()
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_y.unique().tolist() == list(range(10)) and test_y.unique().tolist() == list(range(10))
    assert torch.all(torch.bincount(train_y) == 6000)
