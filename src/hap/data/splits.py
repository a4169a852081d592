"""In-memory splits and seeded, stratified index selection.

A split is two tensors, images (``uint8`` in [0, 255], or float in [0, 1]) and ``int64`` labels, wrapped
in a ``TensorDataset`` so anything that takes a torch dataset still works. Stratified selection keeps
every class's share when a validation split or a quick-test subset is cut out, so a small subset still
sees every class and accuracies on it are comparable to the full split's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["Split", "channel_stats", "stratified_indices"]


class Split(TensorDataset):
    """One split: ``inputs`` ``(N, C, H, W)`` and ``labels`` ``(N,)``, indexable like a TensorDataset.

    Args:
        inputs: Images, ``uint8`` or float in [0, 1].
        labels: Class indices, converted to ``int64``.
        mean: Per-channel mean used to normalise this split's batches. :func:`hap.data.load` sets the
            *training* statistics on every split, so val/test are normalised exactly like train.
        std: Per-channel standard deviation, as ``mean``.
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        if inputs.dim() != 4:
            raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
        if labels.shape != (inputs.shape[0],):
            raise ValueError(f"labels must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}")
        super().__init__(inputs, labels.to(torch.int64))
        self.mean = mean
        self.std = std

    @property
    def inputs(self) -> Tensor:
        """Images ``(N, C, H, W)``."""
        return self.tensors[0]

    @property
    def labels(self) -> Tensor:
        """Labels ``(N,)``, ``int64``."""
        return self.tensors[1]

    def subset(self, indices: Tensor) -> Split:
        """A new split with the given rows (and the same normalisation statistics)."""
        return Split(self.inputs[indices], self.labels[indices], self.mean, self.std)

    def with_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Split:
        """The same tensors with other normalisation statistics."""
        return Split(self.inputs, self.labels, mean, std)

    def to(self, device: torch.device | str) -> Split:
        """Move both tensors, e.g. to the GPU once so batches are sliced there without copies."""
        return Split(self.inputs.to(device), self.labels.to(device), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, inputs={tuple(self.inputs.shape)} {self.inputs.dtype})"


def stratified_indices(labels: Tensor, n_take: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Choose ``n_take`` rows at random while preserving class proportions.

    Each class gets ``n_take * n_c / N`` rows rounded by largest remainder (so quotas sum exactly to
    ``n_take``), drawn by a seeded permutation inside the class.

    Args:
        labels: ``(N,)`` class indices.
        n_take: How many rows to choose, ``0 <= n_take <= N``.
        generator: CPU generator that fixes the choice.

    Returns:
        ``(taken, rest)``: sorted, disjoint index tensors that together cover ``0..N-1``.
    """
    labels = labels.cpu()
    n = labels.numel()
    if not 0 <= n_take <= n:
        raise ValueError(f"cannot take {n_take} of {n} rows")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = [int(c) * n_take / n for c in counts] if n else []
    quotas = [math.floor(e) for e in exact]
    # Largest remainder; ties go to the lower class index so the result is deterministic.
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: n_take - sum(quotas)]:
        quotas[i] += 1
    taken: list[Tensor] = []
    for cls, quota in zip(classes.tolist(), quotas, strict=True):
        members = torch.nonzero(labels == cls).flatten()
        perm = torch.randperm(len(members), generator=generator)
        taken.append(members[perm[:quota]])
    chosen = torch.sort(torch.cat(taken)).values if taken else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[chosen] = False
    return chosen, torch.nonzero(mask).flatten()


def channel_stats(inputs: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of images scaled to [0, 1].

    Accumulated in float64 over chunks, so 60k images need neither a float copy of the whole split nor
    suffer float32 round-off in the sum of squares.

    Args:
        inputs: ``(N, C, H, W)``, ``uint8`` (divided by 255) or float in [0, 1].
        chunk: Images per accumulation step.

    Returns:
        ``(mean, std)`` as tuples of C floats; std is floored at 1e-6 so a constant channel cannot
        divide by zero.
    """
    if inputs.shape[0] == 0:
        raise ValueError("cannot compute statistics of an empty split")
    scale = 255.0 if inputs.dtype == torch.uint8 else 1.0
    channels = inputs.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, inputs.shape[0], chunk):
        block = inputs[start : start + chunk].to(device="cpu", dtype=torch.float64) / scale
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())
