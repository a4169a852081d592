"""CIFAR-10 / CIFAR-100 from the "python version" pickle batches (Krizhevsky 2009).

CIFAR-10's folder (``cifar-10-batches-py``) holds ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``; CIFAR-100's (``cifar-100-python``) holds ``train``, ``test`` and ``meta``. Each batch is
a pickled dict with ``b"data"`` (uint8, N x 3072, channel-major 3x32x32 rows) and ``b"labels"`` (CIFAR-100:
``b"fine_labels"``).

Pickle can run arbitrary code, and these files come from wherever the user downloaded them. The data
folder is the user's own, but we still unpickle with an allow-list that only admits what these batches
contain (dicts, lists, bytes and numpy arrays), so a stray or tampered file fails with a clear error
rather than executing.
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR10_CLASS_NAMES",
    "CifarVariant",
    "detect_cifar",
    "load_cifar",
    "read_batch",
]

CifarVariant = Literal["cifar10", "cifar100"]

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "train": _CIFAR10_TRAIN,
        "test": ("test_batch",),
        "meta": "batches.meta",
        "labels_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "meta": "meta",
        "labels_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
    },
}


def _numpy_global(name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; files pickled by either version name one of them.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no multiarray.{name}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return super().find_class(module, name)
        return _numpy_global(name)


def read_batch(path: str | os.PathLike[str]) -> dict[bytes, Any]:
    """Unpickle one CIFAR batch file (allow-listed globals only).

    Args:
        path: A batch or meta file.

    Returns:
        The pickled dict, with ``bytes`` keys as in the original Python 2 files.

    Raises:
        ValueError: If the file is not a pickle of a dict, or needs anything beyond numpy arrays.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR python-pickle batch ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and labels, got {type(obj).__name__}")
    # Files written by Python 3 tools may use str keys; normalise so lookups need one spelling.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def detect_cifar(path: str | os.PathLike[str]) -> tuple[Path, CifarVariant] | None:
    """Find a CIFAR pickle folder at ``path`` or in its standard subfolder.

    Args:
        path: The batches folder itself, or the folder the archive was extracted into.

    Returns:
        ``(folder, variant)``, or ``None`` if neither layout is there.
    """
    base = Path(path)
    for variant, layout in _LAYOUT.items():
        for folder in (base, base / layout["subdir"]):
            if (folder / layout["train"][0]).is_file() and (folder / layout["test"][0]).is_file():
                return folder, variant  # type: ignore[return-value]
    return None


def _read_split(folder: Path, names: tuple[str, ...], labels_key: bytes, num_classes: int) -> tuple[Tensor, Tensor]:
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder}: missing CIFAR batch file {name!r} (expected {', '.join(names)})")
        batch = read_batch(path)
        if b"data" not in batch or labels_key not in batch:
            raise ValueError(f"{path}: expected keys b'data' and {labels_key!r}, found {sorted(map(repr, batch))}")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        target = np.asarray(batch[labels_key], dtype=np.int64)
        if target.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but {labels_key!r} has shape {target.shape}")
        if len(target) and (target.min() < 0 or target.max() >= num_classes):
            raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
        images.append(data)
        labels.append(target)
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    return x, torch.from_numpy(np.concatenate(labels))


def load_cifar(
    root: str | os.PathLike[str],
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str], CifarVariant]:
    """Read a CIFAR-10 or CIFAR-100 pickle folder.

    Args:
        root: ``cifar-10-batches-py`` / ``cifar-100-python`` or the folder containing it.

    Returns:
        ``((train_x, train_y), (test_x, test_y), class_names, variant)`` with images ``uint8``
        ``(N, 3, 32, 32)`` and labels ``int64``. Class names come from the meta file when present.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If ``root`` holds neither layout, or a file has the wrong format; the message names
            the file or key that was expected.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"CIFAR folder {base} does not exist")
    found = detect_cifar(base)
    if found is None:
        raise ValueError(
            f"{base} is not a CIFAR python-pickle folder: expected data_batch_1..5 and test_batch "
            "(CIFAR-10) or train and test (CIFAR-100), here or in cifar-10-batches-py / cifar-100-python"
        )
    folder, variant = found
    layout = _LAYOUT[variant]
    train = _read_split(folder, layout["train"], layout["labels_key"], layout["num_classes"])
    test = _read_split(folder, layout["test"], layout["labels_key"], layout["num_classes"])
    class_names = _class_names(folder / layout["meta"], layout["names_key"], layout["num_classes"], variant)
    return train, test, class_names, variant


def _class_names(meta: Path, key: bytes, num_classes: int, variant: CifarVariant) -> list[str]:
    if meta.is_file():
        names = read_batch(meta).get(key)
        if names is None or len(names) != num_classes:
            raise ValueError(f"{meta}: expected {key!r} with {num_classes} class names")
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if variant == "cifar10":
        return list(CIFAR10_CLASS_NAMES)
    return [str(i) for i in range(num_classes)]
