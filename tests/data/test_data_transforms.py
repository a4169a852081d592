"""Batch transforms and the slicing loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hap import data
from hap.data import transforms as T
from hap.data.splits import Split


def batch(n: int = 16, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_flip_twice_is_identity() -> None:
    x = batch()
    assert torch.equal(T.hflip(T.hflip(x)), x)
    assert torch.equal(T.random_hflip(T.random_hflip(x, p=1.0), p=1.0), x)
    assert torch.equal(T.random_hflip(x, p=0.0), x)
    assert torch.equal(T.hflip(x)[..., 0], x[..., -1])


def test_random_flip_is_seeded_and_per_image() -> None:
    x = batch(n=64)
    a = T.random_hflip(x, torch.Generator().manual_seed(1))
    b = T.random_hflip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(64)]
    assert 10 < sum(flipped) < 54
    assert all(f or torch.equal(a[i], x[i]) for i, f in enumerate(flipped))


def test_random_crop_is_a_window_of_the_padded_image() -> None:
    x = batch(n=8, size=6)
    out = T.random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(8):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(out, T.random_crop(x, 2, torch.Generator().manual_seed(0)))
    assert torch.equal(T.random_crop(x, 0), x)
    with pytest.raises(ValueError, match="padding"):
        T.random_crop(x, -1)


def test_crop_shifts_vary_and_pad_with_zeros() -> None:
    x = torch.ones(200, 1, 4, 4)
    out = T.random_crop(x, 1, torch.Generator().manual_seed(0))
    zeros_per_image = (out == 0).flatten(1).sum(1)
    assert set(zeros_per_image.tolist()) == {0, 4, 7}  # centred, one-side shift, corner shift


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    f = T.to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    out = T.normalize(f, (0.0, 0.2, 0.5), (1.0, 1.0, 0.25))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="per-channel"):
        T.normalize(f, (0.1, 0.2), (1.0, 1.0))


def test_default_padding() -> None:
    assert T.default_padding(32) == 4 and T.default_padding(28) == 2 and T.default_padding(8) == 1


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = batch(n=10, size=28)
    aug = T.Augment(crop_padding=2, flip=True)
    a, b = aug(x, torch.Generator().manual_seed(0)), aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)


def test_loader_covers_each_row_once_and_normalises(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir, val_fraction=0.1)
    loader = ds.loader("train", 64, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3 and loader.num_samples == 180
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [64, 64, 52]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (180, 1, 28, 28)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4) and x.std().item() == pytest.approx(1.0, abs=1e-2)
    assert sorted(torch.cat(ys).tolist()) == sorted(ds.train.labels.tolist())
    # Undo the normalisation to recover the rows: a permutation of the split.
    pixels = (x * ds.std[0] + ds.mean[0]) * 255
    assert sorted(pixels[:, 0, 0, 0].round().long().tolist()) == sorted(ds.train.inputs[:, 0, 0, 0].tolist())


def test_loader_is_seeded_and_reshuffles_each_epoch(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir)

    def labels_of(epochs: int, seed: int) -> list[list[int]]:
        loader = ds.loader("train", 180, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    first, second = labels_of(2, 0)
    assert first != second
    assert labels_of(2, 0) == [first, second]
    assert labels_of(1, 1)[0] != first


def test_loader_without_shuffle_keeps_order_and_drop_last(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir)
    loader = ds.loader("test", 16, drop_last=True)
    assert len(loader) == 3 and loader.num_samples == 48
    assert torch.cat([y for _, y in loader]).tolist() == ds.test.labels[:48].tolist()


def test_loader_requires_statistics() -> None:
    split = Split(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4))
    with pytest.raises(ValueError, match="mean= and std="):
        data.loader(split, 2)
    out = list(data.loader(split, 3, mean=(0.0,), std=(1.0,)))
    assert [x.shape[0] for x, _ in out] == [3, 1]
    with pytest.raises(ValueError, match="batch_size"):
        data.loader(split, 0, mean=(0.0,), std=(1.0,))


def test_augment_true_uses_default_padding_for_size(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir)
    loader = ds.loader("train", 8, augment=True)
    assert loader.augment == T.Augment(crop_padding=2, flip=True)
    assert ds.loader("train", 8).augment is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir)
    cpu = ds.loader("train", 32, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))
    gpu = ds.loader("train", 32, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0), device="cuda")
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)
