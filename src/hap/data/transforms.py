"""Batch transforms on tensors (CPU or GPU): scaling, normalisation, random crop and horizontal flip.

They act on whole ``(N, C, H, W)`` batches in a few vectorised ops, so augmentation costs about as much
as one extra copy of the batch and runs wherever the batch lives; there is no per-image Python loop and
no worker process. All randomness comes from an explicit ``torch.Generator`` so that a seed fixes the
augmented stream (the global RNG is used only when none is given).

The loader applies them in the order torchvision's CIFAR recipe does: scale to [0, 1], crop with zero
padding, flip, then normalise, so the padded border is black in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Augment",
    "AugmentDraws",
    "default_padding",
    "hflip",
    "normalize",
    "random_crop",
    "random_hflip",
    "to_float",
]


def to_float(x: Tensor) -> Tensor:
    """Images as float32 in [0, 1]: ``uint8`` is divided by 255, floating input is only cast.

    Args:
        x: A batch, ``uint8`` in [0, 255] or floating point already in [0, 1].

    Returns:
        A float32 tensor of the same shape.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _channel_vector(values: Sequence[float] | Tensor, x: Tensor) -> Tensor:
    vec = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    if vec.numel() not in (1, x.shape[1]):
        raise ValueError(f"got {vec.numel()} per-channel values for a batch with {x.shape[1]} channels")
    return vec.reshape(1, -1, 1, 1)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Per-channel ``(x - mean) / std``.

    Args:
        x: Float batch ``(N, C, H, W)`` (use :func:`to_float` first for ``uint8``).
        mean: One value per channel (or one for all).
        std: One value per channel (or one for all).

    Returns:
        The normalised batch (a new tensor).
    """
    return (x - _channel_vector(mean, x)) / _channel_vector(std, x)


def hflip(x: Tensor) -> Tensor:
    """Mirror every image of the batch left to right."""
    return x.flip(-1)


def _draw(generator: torch.Generator | None, device: torch.device, kind: str, n: int, high: int = 2) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot feed a CUDA op) and move to the batch.
    gen_device = generator.device if generator is not None else device
    if kind == "rand":
        out = torch.rand(n, generator=generator, device=gen_device)
    else:
        out = torch.randint(0, high, (n,), generator=generator, device=gen_device)
    return out.to(device)


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip each image independently with probability ``p``.

    Args:
        x: Batch ``(N, C, H, W)``.
        generator: Source of randomness (one draw per image).
        p: Flip probability.

    Returns:
        A new batch; unflipped images are copies of the input.
    """
    flip = _draw(generator, x.device, "rand", x.shape[0]) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` on every side, then cut a random ``H x W`` window per image.

    Args:
        x: Batch ``(N, C, H, W)``.
        padding: Border width; 0 returns the input unchanged.
        generator: Source of randomness (two offsets per image).

    Returns:
        A batch of the input's shape.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n = x.shape[0]
    top = _draw(generator, x.device, "int", n, 2 * padding + 1)
    left = _draw(generator, x.device, "int", n, 2 * padding + 1)
    return _crop_at(x, padding, top, left)


def _crop_at(x: Tensor, padding: int, top: Tensor, left: Tensor) -> Tensor:
    """Zero-pad by ``padding``, then cut the ``H x W`` window at ``(top[i], left[i])`` out of image ``i``."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top, left = top.to(x.device), left.to(x.device)
    rows = (top.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


def default_padding(size: int) -> int:
    """Crop padding of the standard recipes: 4 for 32-pixel images, 2 for smaller ones (28-pixel MNIST).

    Args:
        size: Image side in pixels.

    Returns:
        The padding, about one eighth of the side.
    """
    return 4 if size >= 32 else max(1, min(2, size // 8))


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop with zero padding, then random horizontal flip.

    Attributes:
        crop_padding: Padding of :func:`random_crop` (0 disables cropping).
        flip: Whether to apply :func:`random_hflip` with probability 0.5.
    """

    crop_padding: int = 4
    flip: bool = True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a float batch in [0, 1] (before normalisation)."""
        return self.apply(x, self.draw(x.shape[0], generator, x.device))

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> AugmentDraws:
        """The random parameters of ``n`` images, drawn from ``generator`` in the order :meth:`__call__`
        draws them (crop offsets, then flips): ``apply(x, draw(len(x), g))`` is ``self(x, g)``.

        Drawing apart from applying is what lets one rank of a data-parallel run augment only its rows of
        a global batch (:class:`hap.distributed.GlobalBatchShard`) yet give each row the parameters one
        process would: draw the whole global batch's, then :meth:`AugmentDraws.rows` to keep its own.
        """
        device = torch.device(device)
        top = left = flip = None
        if self.crop_padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.crop_padding}")
        if self.crop_padding > 0:
            top = _draw(generator, device, "int", n, 2 * self.crop_padding + 1)
            left = _draw(generator, device, "int", n, 2 * self.crop_padding + 1)
        if self.flip:
            flip = _draw(generator, device, "rand", n) < 0.5
        return AugmentDraws(top, left, flip)

    def apply(self, x: Tensor, draws: AugmentDraws) -> Tensor:
        """Augment a float batch in [0, 1] with parameters from :meth:`draw` (one per image of ``x``)."""
        if draws.top is not None and draws.left is not None:
            x = _crop_at(x, self.crop_padding, draws.top, draws.left)
        if draws.flip is not None:
            x = torch.where(draws.flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x


@dataclass(frozen=True)
class AugmentDraws:
    """The random parameters :meth:`Augment.draw` drew for a batch: per-image crop offsets and flips
    (``None`` for a transform the recipe does not apply)."""

    top: Tensor | None
    left: Tensor | None
    flip: Tensor | None

    def rows(self, lo: int, hi: int) -> AugmentDraws:
        """The parameters of images ``[lo, hi)`` only."""
        return AugmentDraws(*(None if t is None else t[lo:hi] for t in (self.top, self.left, self.flip)))
