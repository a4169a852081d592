"""Batches from in-memory splits by index slicing: no DataLoader, no worker processes.

On a 2-core machine a ``DataLoader`` with workers spends more time pickling and forking than the model
spends on a ResNet-20 step; the whole of Fashion-MNIST or CIFAR-10 is 47-150 MB of uint8, so holding it
as one tensor and cutting batches out of it is both simpler and faster. Scaling, augmentation and
normalisation happen per batch on the target device (see :mod:`hap.data.transforms`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hap.data.splits import Split
from hap.data.transforms import Augment, default_padding, normalize, to_float

__all__ = ["BatchLoader", "loader"]


class BatchLoader:
    """Iterable of ``(inputs, labels)`` batches: inputs float32 normalised, labels int64.

    Each ``iter()`` is one epoch; with ``shuffle`` it draws a fresh permutation from ``generator``, so a
    seeded generator makes the whole sequence of epochs reproducible.

    Args:
        split: The images and labels to serve.
        batch_size: Rows per batch (the last may be smaller unless ``drop_last``).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
        shuffle: Visit rows in a new random order every epoch.
        augment: Augmentation applied to each batch after scaling to [0, 1] and before normalising.
        generator: Randomness for shuffling and augmentation (global RNG when ``None``).
        device: Where batches are produced; defaults to the split's device.
        drop_last: Skip a final short batch (keeps BatchNorm statistics from a 1-image batch).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: Augment | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else split.inputs.device
        self._mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device)
        self._std = torch.tensor(list(std), dtype=torch.float32, device=self.device)

    @property
    def num_samples(self) -> int:
        """Rows served per epoch."""
        n = len(self.split)
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        inputs, labels = self.split.inputs, self.split.labels
        n = len(labels)
        order: Tensor | None = None
        if self.shuffle:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=self.generator, device=gen_device).to(inputs.device)
        for b in range(len(self)):
            start = b * self.batch_size
            stop = min(start + self.batch_size, n)
            if order is None:
                x, y = inputs[start:stop], labels[start:stop]
            else:
                idx = order[start:stop]
                x, y = inputs[idx], labels[idx]
            non_blocking = self.device.type == "cuda"
            x = to_float(x.to(self.device, non_blocking=non_blocking))
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield normalize(x, self._mean, self._std), y.to(self.device, non_blocking=non_blocking)


def loader(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    augment: bool | Augment = False,
    generator: torch.Generator | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> BatchLoader:
    """Batches of a split, normalised with the split's training statistics.

    Args:
        split: A split from :func:`hap.data.load` (it carries the training mean/std).
        batch_size: Rows per batch.
        shuffle: New random order every epoch.
        augment: ``True`` for the standard recipe (random crop with :func:`default_padding` for the
            image size, random horizontal flip), an :class:`Augment` for a custom one, ``False`` for none.
        generator: Seeded randomness for shuffling and augmentation.
        mean: Override the split's normalisation mean.
        std: Override the split's normalisation standard deviation.
        device: Where batches are produced (default: where the split is).
        drop_last: Skip a final short batch.

    Returns:
        A :class:`BatchLoader`; ``len()`` is the number of batches per epoch.

    Raises:
        ValueError: If no normalisation statistics are given or attached to the split (silently not
            normalising would train a different model than the one evaluated later).
    """
    mean = mean if mean is not None else split.mean
    std = std if std is not None else split.std
    if mean is None or std is None:
        raise ValueError("split has no normalisation statistics: pass mean= and std= (or use hap.data.load)")
    recipe: Augment | None
    if isinstance(augment, Augment):
        recipe = augment
    elif augment:
        recipe = Augment(crop_padding=default_padding(min(split.inputs.shape[-2:])), flip=True)
    else:
        recipe = None
    return BatchLoader(
        split,
        batch_size,
        mean,
        std,
        shuffle=shuffle,
        augment=recipe,
        generator=generator,
        device=device,
        drop_last=drop_last,
    )
