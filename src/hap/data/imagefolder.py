"""Class-per-subfolder image trees (``root/<class>/<image>``), decoded with Pillow into uint8 tensors.

This is the layout torchvision's ``ImageFolder`` reads, so users can point ``hap`` at their own data
without torchvision. Class indices follow sorted folder names, which makes them reproducible across
machines (filesystem listing order is not). Images are resized to one size because the whole split is
held as one tensor; that is what lets batches be cut by slicing instead of a ``DataLoader``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder", "scan_image_folder", "split_folders"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def scan_image_folder(
    root: str | os.PathLike[str], class_names: Sequence[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """List the images of a class-per-subfolder tree.

    Args:
        root: Folder whose subfolders are classes.
        class_names: Fix the class list (e.g. the train split's, when scanning test); folders not in it
            are an error. Default: the sorted subfolder names.

    Returns:
        ``(paths, labels, class_names)``, paths sorted within each class.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If there are no class folders, a class folder has no images, or a folder is not in
            ``class_names``.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{base}: no class subfolders (expected {base}/<class>/<image>.png)")
    names = list(class_names) if class_names is not None else folders
    unknown = sorted(set(folders) - set(names))
    if unknown:
        raise ValueError(f"{base}: class folders {unknown} are not among the classes {names}")
    paths: list[Path] = []
    labels: list[int] = []
    for name in folders:
        files = sorted(p for p in (base / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{base / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(files)
        labels.extend([names.index(name)] * len(files))
    return paths, labels, names


def _mode(path: Path) -> str:
    try:
        with Image.open(path) as image:
            return str(image.mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot decode image ({err})") from err


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def load_image_folder(
    root: str | os.PathLike[str],
    size: int | tuple[int, int] = 32,
    channels: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode every image of a class-per-subfolder tree into one tensor.

    Args:
        root: Folder whose subfolders are classes.
        size: Output height and width (an int for square images); images are resized bilinearly.
        channels: 1 (grayscale) or 3 (RGB). Default: 1 if every image is grayscale, else 3.
        class_names: Fix the class list, see :func:`scan_image_folder`.

    Returns:
        ``(images, labels, class_names)``: images ``uint8`` ``(N, C, H, W)``, labels ``int64``.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If the tree is empty or malformed, ``channels`` is not 1 or 3, or an image cannot
            be decoded (the message names the file).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    paths, labels, names = scan_image_folder(root, class_names)
    height, width = _as_size(size)
    if channels is None:
        # Pillow reads only the header here, so auto-detection does not decode every image twice.
        channels = 1 if all(_mode(path) in _GRAY_MODES for path in paths) else 3
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(paths), height, width, channels), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                converted: Image.Image = image.convert(mode)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: cannot decode image ({err})") from err
        if converted.size != (width, height):
            converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        out[i] = np.asarray(converted, dtype=np.uint8).reshape(height, width, channels)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), names


def split_folders(root: str | os.PathLike[str]) -> dict[str, Path] | None:
    """Detect a ``root/train`` + ``root/test`` (optionally ``root/val``) layout of class trees.

    Args:
        root: Candidate dataset root.

    Returns:
        ``{"train": ..., "test": ...}`` plus ``"val"`` when ``train``, ``val`` and ``test`` all exist.
        With only ``train`` and ``val``, ``val`` becomes the test split: published "val" sets (ImageNet's,
        for one) are what papers report as test accuracy, so model selection must not use them.
        ``None`` for a single tree.
    """
    base = Path(root)
    train, val, test = base / "train", base / "val", base / "test"
    if not train.is_dir():
        return None
    if test.is_dir():
        found = {"train": train, "test": test}
        if val.is_dir():
            found["val"] = val
        return found
    if val.is_dir():
        return {"train": train, "test": val}
    return None
