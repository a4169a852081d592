"""``hap.data.load``: names, validation split held out of train, seeding, subsets, statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hap import data
from hap.data.splits import Split, channel_stats, stratified_indices


def ids(split: Split) -> set[int]:
    """Row identities of the idx fixture: (is_test, row number)."""
    return {int(v) for v in (256 * split.inputs[:, 0, 0, 1].long() + split.inputs[:, 0, 0, 0].long())}


def test_available_names() -> None:
    assert data.available() == ["fashion-mnist", "cifar10", "cifar100"]


def test_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100"):
        data.load("mnist-but-fancy")
    with pytest.raises(ValueError, match="not an existing folder"):
        data.load(str(tmp_path / "no-such-dir"))


def test_val_is_held_out_of_train_and_test_is_untouched(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir, val_fraction=0.2, seed=3)
    train, val, test = ids(ds.train), ids(ds.val), ids(ds.test)
    assert len(train) == 160 and len(val) == 40 and len(test) == 50
    assert not train & val
    assert train | val == set(range(200))  # every train row, none from test
    assert test == {256 + i for i in range(50)}
    assert torch.all(ds.test.labels == torch.arange(50) % 10)  # test kept in file order


def test_val_is_stratified(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir, val_fraction=0.1)
    assert torch.bincount(ds.val.labels, minlength=10).tolist() == [2] * 10
    assert torch.bincount(ds.train.labels, minlength=10).tolist() == [18] * 10


def test_same_seed_same_split_other_seed_other_split(fmnist_dir: Path) -> None:
    a = data.load(fmnist_dir, seed=0)
    b = data.load(fmnist_dir, seed=0)
    c = data.load(fmnist_dir, seed=1)
    assert torch.equal(a.val.inputs, b.val.inputs) and torch.equal(a.train.labels, b.train.labels)
    assert ids(a.val) != ids(c.val)


def test_zero_val_fraction(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir, val_fraction=0.0)
    assert len(ds.val) == 0 and len(ds.train) == 200
    assert ds.val.inputs.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_val_fraction(fmnist_dir: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        data.load(fmnist_dir, val_fraction=fraction)


def test_subset_limits_training_rows_only(fmnist_dir: Path) -> None:
    full = data.load(fmnist_dir, val_fraction=0.2, seed=5)
    small = data.load(fmnist_dir, val_fraction=0.2, seed=5, subset=40)
    # issue 15 item 1: val and test are the full splits, so every run is scored on the same test set
    assert (len(small.train), len(small.val), len(small.test)) == (40, len(full.val), len(full.test))
    assert ids(small.train) <= ids(full.train)
    assert ids(small.val) == ids(full.val)  # the validation rows never leak into train
    assert torch.equal(small.test.labels, full.test.labels)
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [4] * 10
    again = data.load(fmnist_dir, val_fraction=0.2, seed=5, subset=40)
    assert torch.equal(again.train.inputs, small.train.inputs)


def test_subset_larger_than_train_is_the_whole_train(fmnist_dir: Path) -> None:
    assert len(data.load(fmnist_dir, subset=10_000).train) == 180
    with pytest.raises(ValueError, match="subset"):
        data.load(fmnist_dir, subset=0)


def test_statistics_come_from_train_and_are_shared(fmnist_dir: Path) -> None:
    ds = data.load(fmnist_dir, val_fraction=0.2)
    pixels = ds.train.inputs.double() / 255
    assert ds.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-9)
    assert ds.std[0] == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-9)
    for split in (ds.train, ds.val, ds.test):
        assert split.mean == ds.mean and split.std == ds.std
    assert ds.split("val") is ds.val
    with pytest.raises(ValueError, match="train, val, test"):
        ds.split("validation")


def test_channel_stats_per_channel_and_chunked() -> None:
    x = torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.5), torch.rand(4, 4)]).expand(10, 3, 4, 4)
    mean, std = channel_stats(x, chunk=3)
    assert mean[0] == 0 and mean[1] == pytest.approx(0.5) and std[1] == pytest.approx(1e-6)
    assert mean[2] == pytest.approx(x[:, 2].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="empty"):
        channel_stats(x[:0])


def test_stratified_indices_partition_and_quotas() -> None:
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    gen = torch.Generator().manual_seed(0)
    taken, rest = stratified_indices(labels, 6, gen)
    assert len(taken) == 6 and sorted(taken.tolist() + rest.tolist()) == list(range(15))
    # exact quotas 2.8 / 1.2 / 2.0 -> 3 / 1 / 2 by largest remainder
    assert torch.bincount(labels[taken], minlength=3).tolist() == [3, 1, 2]
    assert torch.equal(taken, torch.sort(taken).values)
    with pytest.raises(ValueError, match="cannot take"):
        stratified_indices(labels, 16, gen)


def test_split_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Split(torch.zeros(3, 4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        Split(torch.zeros(3, 1, 4, 4), torch.zeros(2))
    split = Split(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2], dtype=torch.int32))
    x, y = split[1]
    assert x.shape == (1, 4, 4) and y.dtype == torch.int64 and len(split) == 3
