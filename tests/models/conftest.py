"""Shared settings for the model-zoo tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    # These tests run many tiny ops; with 2 cores shared with other jobs, intra-op threads spin-wait
    # and make a 16-channel conv ~50x slower. One thread keeps the file fast and timing-stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
