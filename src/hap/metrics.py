"""What a pruned model costs: parameters, MACs for a given input size, CPU latency, top-1 accuracy.

Every number a plan promises is *measured* on a real (pruned) model with these helpers, never estimated
from channel counts: removing one channel of a residual stream shrinks every layer that reads it, and an
implant adds layers of its own, so only a count on the actual module tree is exact.

MACs are Torch-Pruning's count (``tp.utils.count_ops_and_params``): multiply-accumulates of convolutions
and linear layers plus one operation per element for normalisation, activation and pooling layers. It is
the number the Torch-Pruning and HAP papers report, so the targets here mean the same thing as theirs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from . import _tp
from ._utils import call_model, eval_mode

__all__ = ["ModelCost", "Latency", "count_params", "count_macs", "count_macs_disposable", "measure", "latency",
           "evaluate", "accuracy", "logits_of", "classification_loss"]


@dataclass(frozen=True)
class ModelCost:
    """Size of a model: parameters, and MACs per example for the input it was measured on."""

    params: int
    macs: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass, over ``repeats`` timed runs after ``warmup`` untimed ones.

    Attributes:
        median_ms: The number to compare: robust to the odd slow run on a shared machine.
        p10_ms, p90_ms: Spread of the timed runs.
        repeats: Timed runs.
        threads: ``torch.get_num_threads()`` during the runs.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of one forward pass on ``example_inputs``, divided by its batch size (MACs per example).

    Args:
        model: Any module; not modified (Torch-Pruning's counter works on a copy), modes restored.
        example_inputs: A tensor, a tuple of positional tensors, or a mapping of keyword tensors.
    """
    # Torch-Pruning divides by the batch size of the first positional input itself; keyword inputs
    # (Hugging Face style) reach the model with no positional input, so it prints a warning, assumes
    # batch 1, and we divide here.
    keyword = isinstance(example_inputs, Mapping)
    macs = _tp.count_ops(model, example_inputs)
    return int(round(macs / (_batch_size(example_inputs) if keyword else 1)))


def measure(model: nn.Module, example_inputs: Any) -> ModelCost:
    """Parameters and MACs per example of ``model``."""
    return ModelCost(params=count_params(model), macs=count_macs(model, example_inputs))


def count_macs_disposable(model: nn.Module, example_inputs: Any) -> int:
    """:func:`count_macs` without Torch-Pruning's defensive deep copy, for a model about to be dropped."""
    keyword = isinstance(example_inputs, Mapping)
    macs = _tp.count_ops_disposable(model, example_inputs)
    return int(round(macs / (_batch_size(example_inputs) if keyword else 1)))


def latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> Latency:
    """Time ``model(example_inputs)`` in eval mode without autograd.

    Args:
        model: The model; its train/eval flags are restored afterwards.
        example_inputs: One batch, called the way :func:`hap._utils.call_model` calls it.
        repeats: Timed runs; the median is reported.
        warmup: Untimed runs first (allocator and oneDNN caches warm up).
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); ``None`` keeps the
            current setting. Fix it when comparing models: thread scheduling noise is larger than many of
            the differences being measured.

    Raises:
        ValueError: ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times: list[float] = []
    try:
        p = next(model.parameters(), None)
        cuda = p is not None and p.is_cuda

        def sync() -> None:  # CUDA kernels run asynchronously: time them to completion
            if cuda:
                torch.cuda.synchronize(p.device)

        with eval_mode(model), torch.inference_mode():
            for _ in range(warmup):
                call_model(model, example_inputs)
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                call_model(model, example_inputs)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    times.sort()
    return Latency(
        median_ms=statistics.median(times),
        p10_ms=times[int(0.1 * (len(times) - 1))],
        p90_ms=times[int(round(0.9 * (len(times) - 1)))],
        repeats=repeats,
        threads=used,
    )


def evaluate(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a classifier over ``(inputs, targets)`` batches.

    The one evaluation of the library: the model's output may be logits or an object with ``.logits``
    (Hugging Face), inputs a tensor or a mapping of keyword tensors (:func:`hap._utils.call_model`).
    The model runs in eval mode without autograd; every module's mode is restored after.

    Returns:
        ``{"acc": top-1, "loss": mean cross-entropy, "n": examples}``.

    Raises:
        ValueError: ``batches`` is empty.
    """
    correct = total = 0
    loss = 0.0
    with eval_mode(model), torch.no_grad():
        for inputs, targets in batches:
            logits = logits_of(call_model(model, inputs))
            loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            total += int(targets.numel())
    if total == 0:
        raise ValueError("batches is empty: accuracy needs at least one (inputs, targets) batch")
    return {"acc": correct / total, "loss": loss / total, "n": total}


def accuracy(model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` over ``batches`` (see :func:`evaluate`)."""
    return float(evaluate(model, batches)["acc"])


def logits_of(out: Any) -> torch.Tensor:
    """A classifier's logits: the output itself, or its ``.logits`` (Hugging Face outputs)."""
    return getattr(out, "logits", out)


def classification_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's output (logits, or an object with ``.logits``)."""
    return torch.nn.functional.cross_entropy(logits_of(out), targets)


def _batch_size(example_inputs: Any) -> int:
    """Leading dimension of the first tensor in ``example_inputs`` (1 when there is none)."""
    if isinstance(example_inputs, torch.Tensor):
        return max(1, int(example_inputs.shape[0])) if example_inputs.dim() > 0 else 1
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    if isinstance(values, Iterable):
        for v in values:
            if isinstance(v, torch.Tensor):
                return _batch_size(v)
    return 1
