"""Michel et al. (2019), "Are Sixteen Heads Really Better than One?": ``|dL/dgate_h|`` per head."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._utils import call_model, check_loss, eval_mode, materialize_batches
from ..distributed import all_reduce_sum
from ..units.base import Unit
from ..units.heads import attention_layouts, by_name, head_gates, head_units
from .base import ScoreContext, register_criterion

__all__ = ["michel_scores"]


def michel_scores(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[Any],
    units: Sequence[Unit] | None = None,
    *,
    normalize: bool = True,
    max_batches: int | None = None,
) -> np.ndarray:
    """Head importance of Michel et al. 2019, "Are Sixteen Heads Really Better than One?".

    ``I_h = mean over batches of |dL/dxi_h|`` for a gate ``xi_h`` on every head, all gates at 1 (the
    model unchanged), in eval mode, then divided by the L2 norm of its layer's importances, as the
    original code does by default (``normalize=False`` keeps the raw values). The gradient is taken per
    batch (as the original); with batches of one example it is the paper's per-example expectation.

    Args:
        model: A transformer with supported attention (see :func:`head_units`).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        batches: ``(inputs, targets)`` pairs; mapping inputs are passed as keyword arguments.
        units: Head units to score (default: :func:`head_units` of ``model``), in the order returned.
        normalize: Per-layer L2 normalisation.
        max_batches: Use at most this many batches.

    Returns:
        One float64 score per unit; larger means more important.

    Raises:
        ValueError: Empty batches, or a unit that is not a head of this model.
        RuntimeError: A non-finite loss.
    """
    data = materialize_batches(batches, max_batches)
    layouts = by_name([lay for lay in attention_layouts(model) if lay.num_heads > 0])
    unit_list = head_units(model) if units is None else list(units)
    for u in unit_list:
        if u.group not in layouts or not 0 <= u.index < layouts[u.group].num_heads:
            raise ValueError(f"unit {u.name} is not an attention head of this model")
    named = dict(model.named_modules())
    gates = {}
    for name, lay in layouts.items():
        w = named[lay.output].weight
        gates[name] = torch.ones(lay.num_heads, dtype=w.dtype, device=w.device, requires_grad=True)
    acc = {name: torch.zeros(lay.num_heads, dtype=torch.float64) for name, lay in layouts.items()}
    names = list(gates)
    with eval_mode(model), head_gates(model, gates):
        for b_i, (x, y) in enumerate(data):
            loss = loss_fn(call_model(model, x), y)
            check_loss(loss, b_i)
            grads = torch.autograd.grad(loss, [gates[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[n] += g.detach().double().abs().cpu()
    scores = {}
    batches = all_reduce_sum(len(data))  # under torch.distributed: every rank's batches
    for n, a in acc.items():
        a = all_reduce_sum(a) / batches
        scores[n] = a / (a.norm() + 1e-20) if normalize else a
    return np.array([float(scores[u.group][u.index]) for u in unit_list], dtype=np.float64)


@register_criterion("michel", unit_kinds=("head",), description="Michel et al. 2019: |dL/dgate| per head, "
                    "L2-normalised per layer")
def michel(ctx: ScoreContext) -> np.ndarray:
    return michel_scores(ctx.model, ctx.loss_fn, ctx.data, ctx.units)
