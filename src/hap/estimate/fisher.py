"""Monte-Carlo Fisher curvature and per-example gradients.

The Monte-Carlo Fisher (gradients under labels sampled from the model's own predictive distribution)
equals the Gauss-Newton matrix for softmax cross-entropy: positive by construction, computed exactly from
per-example gradients, with no probe vector. Its block trace ``E[sum_{i in u} g_i^2]`` replaces
``Tr(H_uu)`` in the HAP score; it ranked units far more stably per second than Hutchinson's products in
``benchmarks/hessian_engine.py`` (docs/engine.md). Per-example gradients also serve OBD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .._utils import call_model, check_loss
from .reduce import UnitReducer

__all__ = ["per_example_grads", "fisher_samples", "functional"]

LossFn = Callable[[Any, Any], torch.Tensor]


def functional(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False)
    if isinstance(inputs, tuple | list):
        return functional_call(model, dict(params), args=tuple(inputs), strict=False)
    return functional_call(model, dict(params), args=(inputs,), strict=False)


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, tuple | list) and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError("curvature='fisher' needs the model to output logits (a tensor or an object with .logits)")


def _batched_keys(inputs: Mapping[str, Any], n: int) -> set[str]:
    """Keyword inputs that carry one row per example (others, e.g. a scalar flag, are shared)."""
    return {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n}


def per_example_grads(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, torch.Tensor],
    inputs: Any,
    targets: Any,
    chunk: int = 32,
) -> Iterable[dict[str, torch.Tensor]]:
    """Per-example gradients ``[B, *p.shape]`` of ``loss_fn`` (model in eval mode), in chunks.

    ``vmap`` over ``grad`` gives all examples of a chunk in one vectorised pass; chunking bounds memory
    (B copies of the unit parameters).
    """
    detached = {n: p.detach() for n, p in params.items()}
    n = len(targets)
    keys = _batched_keys(inputs, n) if isinstance(inputs, Mapping) else set()

    def single(ps: dict[str, torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        if isinstance(x, Mapping):
            xb = {k: (v.unsqueeze(0) if k in keys else v) for k, v in x.items()}
        else:
            xb = x.unsqueeze(0)
        return loss_fn(functional(model, ps, xb), y.unsqueeze(0))

    in_x: Any = {k: (0 if k in keys else None) for k in inputs} if isinstance(inputs, Mapping) else 0
    g = vmap(grad(single), in_dims=(None, in_x, 0))
    vectorised = True
    for s in range(0, n, chunk):
        if isinstance(inputs, Mapping):
            xs: Any = {k: (v[s : s + chunk] if k in keys else v) for k, v in inputs.items()}
        else:
            xs = inputs[s : s + chunk]
        ys = targets[s : s + chunk]
        if vectorised:
            try:
                yield g(detached, xs, ys)
                continue
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                # Some models (Hugging Face attention-mask code, data-dependent control flow) cannot be
                # traced by vmap: fall back to one backward pass per example, same result, slower.
                vectorised = False
        yield _looped_grads(model, loss_fn, params, xs, ys, keys)


def _looped_grads(
    model: nn.Module, loss_fn: LossFn, params: dict[str, torch.Tensor], xs: Any, ys: Any, keys: set[str]
) -> dict[str, torch.Tensor]:
    names = list(params)
    rows: list[list[torch.Tensor]] = []
    for i in range(len(ys)):
        if isinstance(xs, Mapping):
            xi: Any = {k: (v[i : i + 1] if k in keys else v) for k, v in xs.items()}
        else:
            xi = xs[i : i + 1]
        loss = loss_fn(call_model(model, xi), ys[i : i + 1])
        gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        rows.append([torch.zeros_like(params[k]) if g is None else g.detach() for k, g in zip(names, gs, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def fisher_samples(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, torch.Tensor],
    batch: tuple[Any, Any],
    batch_index: int,
    reducer: UnitReducer,
    gen: torch.Generator,
    limit: int,
) -> list[np.ndarray]:
    """One row per example: ``sum_{i in u} g_i^2`` with ``g`` the gradient under a label drawn from the
    model's own predictive distribution (its expectation is the Fisher block trace)."""
    inputs, targets = batch
    if isinstance(inputs, Mapping):
        keys = _batched_keys(inputs, len(targets))
        inputs = {k: (v[:limit] if k in keys else v) for k, v in inputs.items()}
    else:
        inputs = inputs[:limit]
    with torch.no_grad():
        outputs = call_model(model, inputs)
        check_loss(loss_fn(outputs, targets[: len(_logits(outputs))]), batch_index)
        logits = _logits(outputs)
        probs = torch.softmax(logits.double(), dim=-1)
        sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
    sampled = sampled.to(getattr(targets, "dtype", torch.long))
    rows: list[np.ndarray] = []
    for g in per_example_grads(model, loss_fn, params, inputs, sampled):
        rows.extend(reducer({n: t * t for n, t in g.items()}, batched=True).numpy())
    return rows
