"""CIFAR python-pickle folders: layout, pixel order, auto-detection and clear errors."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hap import data
from hap.data.cifar import detect_cifar, load_cifar, read_batch


def test_load_cifar10_folder(cifar_dir: Path) -> None:
    (train_x, train_y), (test_x, test_y), names, variant = load_cifar(cifar_dir)
    assert variant == "cifar10"
    assert train_x.shape == (40, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (10, 3, 32, 32)
    assert train_y.tolist() == [i % 10 for i in range(40)] and train_y.dtype == torch.int64
    assert test_y.tolist() == list(range(10))
    assert names[0] == "airplane" and len(names) == 10


def test_rows_are_channel_major_planes(cifar_dir: Path) -> None:
    raw = read_batch(cifar_dir / "data_batch_1")[b"data"]
    (train_x, _), _, _, _ = load_cifar(cifar_dir)
    for channel in range(3):
        plane = raw[0, 1024 * channel : 1024 * (channel + 1)].reshape(32, 32)
        np.testing.assert_array_equal(train_x[0, channel].numpy(), plane)


def test_parent_folder_is_accepted(cifar_dir: Path) -> None:
    assert detect_cifar(cifar_dir.parent) == (cifar_dir, "cifar10")
    assert load_cifar(cifar_dir.parent)[3] == "cifar10"


def test_load_by_name_and_by_path(cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_name = data.load("cifar10", root=cifar_dir, val_fraction=0.2)
    by_path = data.load(str(cifar_dir), val_fraction=0.2)
    assert (len(by_name.train), len(by_name.val), len(by_name.test)) == (32, 8, 10)
    assert torch.equal(by_name.train.inputs, by_path.train.inputs)
    assert by_name.in_channels == 3 and by_name.num_classes == 10 and by_name.class_names[-1] == "truck"
    monkeypatch.setenv("HAP_CIFAR10", os.fspath(cifar_dir))
    assert len(data.load("CIFAR-10", val_fraction=0.2).train) == 32


def test_named_cifar_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAP_CIFAR10", raising=False)
    with pytest.raises(ValueError, match="root="):
        data.load("cifar10")


def test_missing_meta_falls_back_to_standard_names(cifar_dir: Path) -> None:
    (cifar_dir / "batches.meta").unlink()
    assert load_cifar(cifar_dir)[2][1] == "automobile"


def test_missing_labels_key_is_named(cifar_dir: Path, write_pickle: Callable[[Path, object], None]) -> None:
    write_pickle(cifar_dir / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"fine": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3.*b'labels'"):
        load_cifar(cifar_dir)


def test_wrong_data_shape_is_named(cifar_dir: Path, write_pickle: Callable[[Path, object], None]) -> None:
    write_pickle(cifar_dir / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar(cifar_dir)


def test_missing_batch_is_named(cifar_dir: Path) -> None:
    (cifar_dir / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="data_batch_4"):
        load_cifar(cifar_dir)


def test_not_a_pickle_or_not_a_dict(cifar_dir: Path, write_pickle: Callable[[Path, object], None]) -> None:
    (cifar_dir / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar(cifar_dir)
    write_pickle(cifar_dir / "data_batch_2", [1, 2, 3])
    with pytest.raises(ValueError, match="expected a pickled dict"):
        load_cifar(cifar_dir)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_arbitrary_globals(cifar_dir: Path) -> None:
    with open(cifar_dir / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load global"):
        load_cifar(cifar_dir)


def test_not_a_cifar_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_batch_1"):
        load_cifar(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_cifar(tmp_path / "absent")


def test_cifar100_layout(tmp_path: Path, write_pickle: Callable[[Path, object], None]) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 100)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)]}
        write_pickle(root / split, batch | {b"coarse_labels": [0] * n})
    write_pickle(root / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    ds = data.load(str(tmp_path), val_fraction=0.5)
    assert ds.num_classes == 100 and ds.class_names[7] == "c7"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (100, 100, 100)
    with pytest.raises(ValueError, match="not cifar10"):
        data.load("cifar10", root=root)
