"""Small helpers every stage shares: calling a model on its batch, eval mode, batches, loss checks,
thread counts, architecture signatures and atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` the way its batches say: a mapping is keyword arguments (Hugging Face style)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


class eval_mode:
    """Context manager: BatchNorm and dropout in eval mode, every module's own flag restored after.

    The Hessian of a network in train mode mixes in batch statistics and dropout noise, neither of which
    exists at inference; eval mode makes the loss a deterministic function of the weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path`` (readers never see half).

    The file is made 0644: ``mkstemp`` creates 0600, and results nobody else on the machine can read are
    not what anyone expects of a report or a config.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path




def materialize_batches(batches: Iterable[Any], max_batches: int | None) -> list[tuple[Any, Any]]:
    """Take up to ``max_batches`` ``(inputs, targets)`` pairs, so the engine can revisit them.

    Raises:
        ValueError: The iterable is empty or yields something other than pairs.
    """
    out = []
    for i, b in enumerate(islice(iter(batches), max_batches)):
        if not isinstance(b, tuple | list) or len(b) != 2:
            raise ValueError(
                f"batch {i} is a {type(b).__name__}; batches must yield (inputs, targets) pairs"
            )
        out.append((b[0], b[1]))
    if not out:
        raise ValueError("batches is empty: give at least one (inputs, targets) batch")
    return out


def check_loss(loss: torch.Tensor, batch_index: int) -> None:
    if loss.dim() != 0:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a scalar")
    if not torch.isfinite(loss).item():
        raise RuntimeError(
            f"the loss is {loss.item()} on batch {batch_index}: check the inputs for NaN/inf and that the "
            "model's weights are finite"
        )


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: error messages here stay one line long."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_signature(model: nn.Module) -> str:
    """Hash of parameter names and shapes: identifies an architecture (and width), not its weights."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


class threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous value restored after.

    A library call that changes torch's thread pool must give it back: the caller's setting is process
    global state.
    """

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.old = 0

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)
