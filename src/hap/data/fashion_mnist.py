"""Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``.

The package installs ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
We parse the idx format ourselves (a 4-byte magic number giving dtype and rank, then big-endian uint32
dimensions, then the raw array) rather than depend on torchvision, and check every header so a truncated
download or a wrong file fails loudly instead of producing shifted images.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FILES",
    "find_root",
    "load_fashion_mnist",
    "read_idx",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_ROOT` when no ``root`` argument is given.
ENV_VAR = "HAP_FASHION_MNIST"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# idx type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Parse one idx file (gzip-compressed if its name ends in ``.gz``).

    Args:
        path: The file to read.

    Returns:
        A tensor with the file's shape and a native-endian dtype (``uint8`` for images and labels).

    Raises:
        ValueError: If the magic number, type code, rank or payload size is wrong; the message names
            the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise ValueError(f"{path}: cannot read as {'gzip ' if path.suffix == '.gz' else ''}idx: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (magic number must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: idx header declares rank 0")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes for rank {ndim})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx payload has {len(raw) - header} bytes, header shape {shape} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Copy into native byte order: torch has no big-endian dtypes, and frombuffer views are read-only.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the Fashion-MNIST folder: ``root``, else ``$HAP_FASHION_MNIST``, else the Debian path.

    Args:
        root: Explicit folder holding the four idx files.

    Returns:
        The folder, which exists.

    Raises:
        FileNotFoundError: If the folder does not exist; the message says how to install it.
    """
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {path}: run `apt-get install dataset-fashion-mnist` "
            f"or pass a folder with the idx .gz files (root=... or ${ENV_VAR})"
        )
    return path


def _load_pair(root: Path, images_name: str, labels_name: str) -> tuple[Tensor, Tensor]:
    paths = [root / images_name, root / labels_name]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing: expected {', '.join(FILES.values())} in {root} "
                "(`apt-get install dataset-fashion-mnist` provides them)"
            )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"{paths[0]}: expected uint8 images of rank 3, got {images.dtype} {tuple(images.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{paths[1]}: expected rank-1 labels, got shape {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    labels = labels.to(torch.int64)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASS_NAMES)):
        raise ValueError(f"{paths[1]}: labels outside 0..{len(CLASS_NAMES) - 1}")
    return images.unsqueeze(1), labels


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Read the Fashion-MNIST train and test splits.

    Args:
        root: Folder with the four idx files; defaults to ``$HAP_FASHION_MNIST`` or
            ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels))``: images ``uint8`` of shape
        ``(N, 1, 28, 28)``, labels ``int64`` of shape ``(N,)``.

    Raises:
        FileNotFoundError: If the folder or one of its files is missing.
        ValueError: If a file is not a valid idx file of the expected shape.
    """
    path = find_root(root)
    train = _load_pair(path, FILES["train_images"], FILES["train_labels"])
    test = _load_pair(path, FILES["test_images"], FILES["test_labels"])
    return train, test
