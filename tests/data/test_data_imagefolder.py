"""ImageFolder trees decoded with Pillow: class order, resizing, channels, layouts and errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hap import data
from hap.data.imagefolder import load_image_folder, scan_image_folder


def test_classes_sorted_and_images_resized(image_dir: Path) -> None:
    x, y, names = load_image_folder(image_dir, size=12)
    assert names == ["ant", "cat", "dog"]
    assert x.shape == (15, 3, 12, 12) and x.dtype == torch.uint8
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # "ant" was written second (class value 10 + i): constant images stay constant after resizing.
    assert x[0].unique().tolist() == [10] and x[5].unique().tolist() == [0]


def test_non_square_size(image_dir: Path) -> None:
    x, _, _ = load_image_folder(image_dir, size=(8, 10))
    assert x.shape[-2:] == (8, 10)


def test_grayscale_tree_gives_one_channel(tmp_path: Path, write_png: Callable[..., None]) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_png(tmp_path / name / "0.png", 100, (8, 8), mode="L")
    x, _, _ = load_image_folder(tmp_path, size=8)
    assert x.shape == (2, 1, 8, 8)
    assert load_image_folder(tmp_path, size=8, channels=3)[0].shape == (2, 3, 8, 8)


def test_mixed_modes_give_rgb(image_dir: Path, write_png: Callable[..., None]) -> None:
    write_png(image_dir / "ant" / "gray.png", 5, (8, 8), mode="L")
    assert load_image_folder(image_dir, size=8)[0].shape[1] == 3


def test_load_single_tree_splits_test_off(image_dir: Path) -> None:
    ds = data.load(image_dir, val_fraction=0.2, image_size=16, test_fraction=0.2)
    assert ds.class_names == ("ant", "cat", "dog")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 2, 3)
    ids = [set(s.inputs[:, 0, 0, 0].tolist()) for s in (ds.train, ds.val, ds.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sorted(ids[0] | ids[1] | ids[2]) == sorted(10 * c + i for c in range(3) for i in range(5))
    assert sorted(ds.test.labels.tolist()) == [0, 1, 2]  # stratified: one test image per class


def test_train_test_layout(tmp_path: Path, write_png: Callable[..., None]) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for c in ("x", "y"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                write_png(tmp_path / split / c / f"{i}.png", 50 * (split == "test") + i, (8, 8))
    ds = data.load(str(tmp_path), val_fraction=0.25, image_size=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert set(ds.test.inputs[:, 0, 0, 0].tolist()) == {50, 51}


def test_explicit_val_folder_is_used(tmp_path: Path, write_png: Callable[..., None]) -> None:
    for split in ("train", "val", "test"):
        for c in ("x", "y"):
            (tmp_path / split / c).mkdir(parents=True)
            write_png(tmp_path / split / c / "0.png", 1, (8, 8))
    ds = data.load(str(tmp_path), image_size=8)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2, 2, 2)


def test_test_split_with_unknown_class_is_rejected(tmp_path: Path, write_png: Callable[..., None]) -> None:
    for split, classes in (("train", ("x",)), ("test", ("x", "z"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            write_png(tmp_path / split / c / "0.png", 1, (8, 8))
    with pytest.raises(ValueError, match=r"\['z'\]"):
        data.load(str(tmp_path), image_size=8)


def test_empty_root_and_empty_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="has no images"):
        scan_image_folder(tmp_path)


def test_corrupt_image_is_named(image_dir: Path) -> None:
    (image_dir / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(image_dir)


def test_bad_channels_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, channels=2)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "absent")
