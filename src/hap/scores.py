"""Baseline criteria on the same units as HAP: one function each, one signature.

Each function returns a per-unit float64 array where *larger means more important*. They share
the unit slicing of HAP (``scope`` included), so a comparison changes only the score.

- ``l1`` / ``l2``: sum of ``|w|`` / of ``w**2`` over the unit (group magnitude, as Torch-Pruning's
  ``MagnitudeImportance`` with group reduction ``sum``).
- ``taylor``: first-order Taylor, ``|sum_u g*w|`` per batch, averaged over batches (Molchanov et al.).
- ``obd``: Optimal Brain Damage with the empirical Fisher diagonal, ``1/2 sum_u w^2 E[g^2]``, where the
  expectation is over *examples* (per-example gradients under the true labels), not the square of a
  batch-mean gradient, which would be biased low by a factor of the batch size.
- ``michel``: for attention heads, Michel et al. (2019), ``|dL/dgate_h|`` per-layer L2-normalised.
- ``random``: seeded uniform noise (the floor every criterion must clear).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ._reduce import UnitReducer
from .heads import eager_attention, michel_scores
from .hessian import call_model, check_loss, eval_mode, per_example_grads

__all__ = ["magnitude_l1", "magnitude_l2", "taylor", "obd", "random_scores", "BASELINES"]

LossFn = Callable[[Any, Any], torch.Tensor]


def magnitude_l1(params: Mapping[str, torch.Tensor], reducer: UnitReducer, **_: Any) -> np.ndarray:
    return reducer({n: p.abs() for n, p in params.items()}).numpy()


def magnitude_l2(params: Mapping[str, torch.Tensor], reducer: UnitReducer, **_: Any) -> np.ndarray:
    return reducer({n: p * p for n, p in params.items()}).numpy()


def taylor(
    params: Mapping[str, torch.Tensor],
    reducer: UnitReducer,
    *,
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[tuple[Any, Any]],
    **_: Any,
) -> np.ndarray:
    names = list(params)
    acc = np.zeros(reducer.num_units)
    with eval_mode(model):
        for b_i, (x, y) in enumerate(data):
            loss = loss_fn(call_model(model, x), y)
            check_loss(loss, b_i)
            gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            gw = {n: g * params[n].detach() for n, g in zip(names, gs, strict=True) if g is not None}
            acc += np.abs(reducer(gw).numpy())
    return acc / len(data)


def obd(
    params: Mapping[str, torch.Tensor],
    reducer: UnitReducer,
    *,
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[tuple[Any, Any]],
    **_: Any,
) -> np.ndarray:
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    with eval_mode(model), eager_attention(model):
        for b_i, (x, y) in enumerate(data):
            with torch.no_grad():
                check_loss(loss_fn(call_model(model, x), y), b_i)
            for g in per_example_grads(model, loss_fn, dict(params), x, y):
                for n, t in g.items():
                    sq[n] += (t.double() ** 2).sum(0)
                count += next(iter(g.values())).shape[0]
    return 0.5 * reducer({n: params[n].detach().double() ** 2 * sq[n] / count for n in params}).numpy()


def random_scores(params: Mapping[str, torch.Tensor], reducer: UnitReducer, *, seed: int = 0, **_: Any) -> np.ndarray:
    return np.random.default_rng(seed).random(reducer.num_units)


def michel(
    params: Mapping[str, torch.Tensor],
    reducer: UnitReducer,
    *,
    model: nn.Module,
    loss_fn: LossFn,
    data: Sequence[tuple[Any, Any]],
    units: Sequence[Any],
    **_: Any,
) -> np.ndarray:
    """Michel et al. (2019) head importance: |dL/dgate_h|, L2-normalised per layer (head units only)."""
    return michel_scores(model, loss_fn, data, units)


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "michel": michel,
    "l1": magnitude_l1,
    "magnitude": magnitude_l1,
    "l2": magnitude_l2,
    "taylor": taylor,
    "obd": obd,
    "random": random_scores,
}
