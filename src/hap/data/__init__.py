"""Datasets as in-memory tensors: Fashion-MNIST (packaged), CIFAR pickle folders, ImageFolder trees.

``load("fashion-mnist")`` returns a :class:`Dataset` with ``train``/``val``/``test`` splits of ``uint8``
images and ``int64`` labels, the normalisation statistics of the training split, and class names.
``ds.loader("train", 128, shuffle=True, augment=True)`` then yields normalised float batches.

The validation split is always cut out of the *training* data (seeded and stratified); the test split
is never touched until the final report, because choosing checkpoints or hyper-parameters on it would
make the reported accuracy optimistic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hap.data.batches import BatchLoader, loader
from hap.data.cifar import detect_cifar, load_cifar
from hap.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from hap.data.fashion_mnist import FILES as FASHION_MNIST_FILES
from hap.data.fashion_mnist import load_fashion_mnist
from hap.data.imagefolder import load_image_folder, split_folders
from hap.data.splits import Split, channel_stats, stratified_indices
from hap.data.transforms import Augment
from hap.distributed import GlobalBatchShard

__all__ = [
    "Augment",
    "BatchLoader",
    "Dataset",
    "Split",
    "available",
    "load",
    "loader",
]

#: Environment variables that supply ``root`` for named datasets when none is passed.
ROOT_ENV_VARS = {"cifar10": "HAP_CIFAR10", "cifar100": "HAP_CIFAR100"}

_NAMES = ("fashion-mnist", "cifar10", "cifar100")
_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """A dataset ready for training: three splits plus what a model and a loader need to know.

    Attributes:
        name: Canonical name ("fashion-mnist", "cifar10", ...) or the folder it was read from.
        train: Training rows (what remains after holding out ``val``).
        val: Held out of the original training data, for model selection.
        test: The original test data, for the final number only.
        num_classes: Number of classes.
        in_channels: Image channels (1 or 3).
        mean: Per-channel mean of ``train`` in [0, 1] units.
        std: Per-channel standard deviation of ``train``.
        class_names: Class index -> name.
        image_size: ``(height, width)``.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    image_size: tuple[int, int]

    def split(self, name: str) -> Split:
        """The split called ``name`` ("train", "val" or "test")."""
        if name not in _SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(_SPLITS)}")
        split: Split = getattr(self, name)
        return split

    def loader(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        augment: bool | Augment = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        shard: GlobalBatchShard | None = None,
    ) -> BatchLoader:
        """Batches of one split normalised with the training statistics; see :func:`hap.data.loader`
        (``shard``: this rank's rows of every global batch only, :class:`hap.distributed.GlobalBatchShard`)."""
        return loader(
            self.split(split),
            batch_size,
            shuffle,
            augment,
            generator,
            mean=self.mean,
            std=self.std,
            device=device,
            drop_last=drop_last,
            shard=shard,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"classes={self.num_classes}, shape={(self.in_channels, *self.image_size)})"
        )


def available() -> list[str]:
    """Dataset names :func:`load` accepts (besides a path to a folder)."""
    return list(_NAMES)


def load(
    name_or_path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    subset: int | None = None,
    image_size: int | tuple[int, int] = 32,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a dataset by name or folder, hold out a validation split, attach training statistics.

    Args:
        name_or_path: "fashion-mnist", "cifar10", "cifar100", or a folder: a CIFAR pickle folder, a
            folder with the four Fashion-MNIST idx files, or an ImageFolder tree (``<class>/<image>``,
            or ``train/``+``test/`` each of that form).
        root: Folder for a named dataset. Fashion-MNIST defaults to ``$HAP_FASHION_MNIST`` or the
            Debian package's folder; CIFAR needs it (or ``$HAP_CIFAR10`` / ``$HAP_CIFAR100``).
        val_fraction: Share of the training data held out as ``val`` (stratified, seeded). Ignored when
            an ImageFolder provides ``val/`` next to ``train/`` and ``test/``.
        seed: Fixes the validation split and the subset.
        subset: Keep only this many training rows (seeded, stratified), for quick runs. The validation
            and test splits are never shrunk: every run of a dataset is scored on the same test set, so
            numbers from runs with different subsets (and ``hap eval``) stay comparable.
        image_size: Resize ImageFolder images to this size (ignored for the fixed-size datasets).
        test_fraction: Share of a single-tree ImageFolder held out as ``test`` (such a tree has no
            test split of its own).

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: For an unknown name (the message lists the valid ones), a bad fraction, a missing
            CIFAR root, or malformed files.
        FileNotFoundError: If a named dataset's folder does not exist.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of training rows, got {subset}")
    generator = torch.Generator().manual_seed(seed)
    raw = _read(name_or_path, root, image_size, test_fraction, generator)
    name, (train_x, train_y), (test_x, test_y), class_names, given_val = raw

    if given_val is not None:
        val_x, val_y = given_val
    else:
        val_idx, train_idx = stratified_indices(train_y, round(val_fraction * len(train_y)), generator)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    train, val, test = Split(train_x, train_y), Split(val_x, val_y), Split(test_x, test_y)

    if subset is not None and subset < len(train):
        train = _stratified_subset(train, subset, generator)

    mean, std = channel_stats(train.inputs)
    return Dataset(
        name=name,
        train=train.with_stats(mean, std),
        val=val.with_stats(mean, std),
        test=test.with_stats(mean, std),
        num_classes=len(class_names),
        in_channels=int(train.inputs.shape[1]),
        mean=mean,
        std=std,
        class_names=tuple(class_names),
        image_size=(int(train.inputs.shape[2]), int(train.inputs.shape[3])),
    )


def _stratified_subset(split: Split, n: int, generator: torch.Generator) -> Split:
    taken, _ = stratified_indices(split.labels, n, generator)
    return split.subset(taken)


_Pair = tuple[Tensor, Tensor]


def _read(
    name_or_path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None,
    image_size: int | tuple[int, int],
    test_fraction: float,
    generator: torch.Generator,
) -> tuple[str, _Pair, _Pair, list[str], _Pair | None]:
    """Read train/test (and an explicit val, if the layout has one) before any splitting."""
    key = _ALIASES.get(str(name_or_path).strip().lower())
    if key == "fashion-mnist":
        train, test = load_fashion_mnist(root)
        return key, train, test, list(FASHION_MNIST_CLASSES), None
    if key in ("cifar10", "cifar100"):
        folder = root if root is not None else os.environ.get(ROOT_ENV_VARS[key])
        if folder is None:
            raise ValueError(f"{key} needs root=<folder with the python-pickle batches> (or ${ROOT_ENV_VARS[key]})")
        train, test, names, variant = load_cifar(folder)
        if variant != key:
            raise ValueError(f"{folder} holds {variant}, not {key}")
        return key, train, test, names, None

    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(
            f"unknown dataset {str(name_or_path)!r}: not one of {', '.join(_NAMES)} and not an existing folder"
        )
    if detect_cifar(path) is not None:
        train, test, names, _ = load_cifar(path)
        return str(path), train, test, names, None
    if all((path / f).is_file() for f in FASHION_MNIST_FILES.values()):
        train, test = load_fashion_mnist(path)
        return str(path), train, test, list(FASHION_MNIST_CLASSES), None
    return _read_image_folder(path, image_size, test_fraction, generator)


def _read_image_folder(
    path: Path, image_size: int | tuple[int, int], test_fraction: float, generator: torch.Generator
) -> tuple[str, _Pair, _Pair, list[str], _Pair | None]:
    layout = split_folders(path)
    if layout is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        x, y, names = load_image_folder(path, image_size)
        test_idx, train_idx = stratified_indices(y, round(test_fraction * len(y)), generator)
        return str(path), (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), names, None
    train_x, train_y, names = load_image_folder(layout["train"], image_size)
    channels = int(train_x.shape[1])
    test_x, test_y, _ = load_image_folder(layout["test"], image_size, channels, class_names=names)
    val = None
    if "val" in layout:
        val_x, val_y, _ = load_image_folder(layout["val"], image_size, channels, class_names=names)
        val = (val_x, val_y)
    return str(path), (train_x, train_y), (test_x, test_y), names, val
