"""Fixtures of the CLI tests: a tiny Fashion-MNIST in the real on-disk format."""

from __future__ import annotations

import pytest


@pytest.fixture
def fmnist_dir(tmp_path):
    """A tiny Fashion-MNIST in the real idx.gz format, so the CLI runs without the Debian package."""
    return write_tiny_fmnist(tmp_path / "fmnist")


def write_tiny_fmnist(root):
    """240 training and 60 test images with a learnable stripe per class, as the four idx.gz files."""
    import gzip
    import struct

    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", 240), ("t10k", 60)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        images[np.arange(n), labels * 2] = 255  # a learnable stripe (row) per class
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root
