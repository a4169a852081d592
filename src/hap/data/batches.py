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
from hap.distributed import GlobalBatchShard

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
        shard: Serve only this rank's rows of every global batch (data-parallel training): the order,
            the batches and the augmentation parameters are drawn for the whole global batch as one
            process would, but only rows ``shard.rows(...)`` are indexed, converted, augmented and
            normalised, so each rank's loading costs ``1 / W`` of one process's. ``len()`` still counts
            global batches; :meth:`global_batch_rows` gives each one's size (for the loss weight).
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
        shard: GlobalBatchShard | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self.shard = None if shard is None or shard.whole else shard
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

    def global_batch_rows(self, b: int) -> int:
        """Rows of global batch ``b`` (all ranks together): what a sharded batch's loss weight is relative to."""
        return min(self.batch_size, len(self.split) - b * self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        inputs, labels = self.split.inputs, self.split.labels
        n = len(labels)
        order: Tensor | None = None
        if self.shuffle:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=self.generator, device=gen_device).to(inputs.device)
        shard = self.shard
        # a custom augmentation (a subclass overriding __call__) cannot be drawn for rows it does not see:
        # it augments the whole global batch, which is then cut (same rows, no saving)
        split_draws = shard is not None and type(self.augment).__call__ is Augment.__call__
        non_blocking = self.device.type == "cuda"
        for b in range(len(self)):
            start = b * self.batch_size
            stop = min(start + self.batch_size, n)
            idx: Tensor | slice = slice(start, stop) if order is None else order[start:stop]
            lo, hi = (0, stop - start) if shard is None else shard.load_bounds(stop - start)
            if split_draws or self.augment is None:
                idx = _rows(idx, lo, hi)
            x, y = inputs[idx], labels[idx]
            x = to_float(x.to(self.device, non_blocking=non_blocking))
            if self.augment is not None and split_draws:
                x = self.augment.apply(x, self.augment.draw(stop - start, self.generator, self.device).rows(lo, hi))
            elif self.augment is not None:
                x = self.augment(x, self.generator)
                if shard is not None:
                    x, y = x[lo:hi], y[lo:hi]
            yield normalize(x, self._mean, self._std), y.to(self.device, non_blocking=non_blocking)


def _rows(idx: Tensor | slice, lo: int, hi: int) -> Tensor | slice:
    """Rows ``[lo, hi)`` of a batch's index (a permutation's slice or a contiguous range)."""
    if isinstance(idx, slice):
        return slice(idx.start + lo, idx.start + hi)
    return idx[lo:hi]


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
    shard: GlobalBatchShard | None = None,
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
        shard: Load only this rank's rows of every global batch (see :class:`BatchLoader`).

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
        shard=shard,
    )
