"""Monte-Carlo Fisher curvature and per-example gradients.

The Monte-Carlo Fisher (gradients under labels sampled from the model's own predictive distribution)
equals the Gauss-Newton matrix for softmax cross-entropy: positive by construction, computed exactly from
per-example gradients, with no probe vector. Its block trace ``E[sum_{i in u} g_i^2]`` replaces
``Tr(H_uu)`` in the HAP score; it ranked units far more stably per second than Hutchinson's products in
``benchmarks/hessian_engine.py`` (docs/engine.md). Per-example gradients also serve OBD.

Two ways to the same rows (:class:`FisherSampler`): ``vmap`` over per-example gradients, the exact
reference, and layer hooks (:mod:`hap.estimate.batchgrad`) that get each unit's per-example squared
gradient from its layers' inputs and output gradients without ever holding per-example gradients, for
models whose per-example gradients do not fit (``benchmarks/fisher_backends.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .._utils import call_model, check_loss
from .batchgrad import HookPlan, _MultiCall, lean_support
from .reduce import UnitReducer

__all__ = ["per_example_grads", "fisher_samples", "functional", "FisherSampler", "FISHER_BACKENDS",
           "example_losses"]

FISHER_BACKENDS = ("auto", "vmap", "hooks")

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


def _example_rows(outputs: Any, i: int, n: int) -> Any:
    """Example ``i`` of batched model outputs (a tensor, a Hugging Face output object, a dict or tuple)."""
    if isinstance(outputs, torch.Tensor):
        return outputs[i : i + 1]
    if isinstance(outputs, Mapping):
        items = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                 for k, v in outputs.items()}
        return type(outputs)(**items)
    if isinstance(outputs, tuple | list):
        return type(outputs)(_example_rows(o, i, n) if isinstance(o, torch.Tensor) else o for o in outputs)
    raise TypeError(f"cannot split model outputs of type {type(outputs).__name__} into examples")


def example_losses(loss_fn: LossFn) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``(outputs, targets) -> sum over examples of loss_fn(example outputs, example targets)``.

    Its gradient with respect to the outputs of example ``n`` is the gradient of example ``n``'s own
    loss, whatever ``loss_fn``'s reduction (mean over the batch, over tokens, sum): what the per-example
    gradients of the ``vmap`` path differentiate too.
    """

    def total(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        n = len(targets)
        return torch.stack([loss_fn(_example_rows(outputs, i, n), targets[i : i + 1]) for i in range(n)]).sum()

    return total


class FisherSampler:
    """Monte-Carlo Fisher rows for one estimate, by the ``vmap`` reference or by layer hooks.

    ``backend="hooks"`` (:mod:`hap.estimate.batchgrad`) computes each unit's per-example squared
    gradient from the inputs and output gradients of its layers, never holding per-example gradients;
    parameters the hooks cannot serve (an unsupported layer type, a module run twice per forward) go
    through ``vmap`` alone, and :attr:`fallback` says which and why. ``"auto"`` uses the hooks when they
    serve every parameter, else ``vmap``; ``"vmap"`` is the exact reference.

    Args:
        model: The network (in eval mode while sampling).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        params: The unit parameters, by qualified name.
        reducer: Their per-unit reducer.
        backend: ``"auto"``, ``"vmap"`` or ``"hooks"``.
        chunk: Examples per forward/backward pass of the hook path (bounds its activation memory).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: dict[str, torch.Tensor], reducer: UnitReducer,
                 backend: str = "auto", chunk: int = 64) -> None:
        if backend not in FISHER_BACKENDS:
            raise ValueError(f"fisher_backend must be one of {', '.join(FISHER_BACKENDS)}, got {backend!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.params = params
        self.reducer = reducer
        self.mode = backend
        self.chunk = max(1, int(chunk))
        needed = [p for p in params if p in reducer.needs()]  # scope="producer" leaves some out
        served, why = lean_support(model, needed) if backend != "vmap" else ({}, {})
        if backend == "auto" and why:
            served = {}
        self.fallback: dict[str, str] = {p: why.get(p, "fisher_backend='vmap'") for p in needed if p not in served}
        self._served = served
        self._plan = HookPlan(model, params, reducer.needs(), served) if served else None

    @property
    def backend(self) -> str:
        """What served the rows: ``"hooks"``, ``"vmap"``, or ``"hooks+vmap"`` (some parameters each)."""
        if self._plan is None:
            return "vmap"
        return "hooks+vmap" if self.fallback else "hooks"

    def _demote(self, modules: Sequence[str]) -> None:
        gone = {p for p, (m, _) in self._served.items() if m in modules or self.mode == "auto"}
        for p in gone:
            self.fallback[p] = "its module runs more than once per forward pass"
        self._served = {p: v for p, v in self._served.items() if p not in gone}
        if self.mode == "hooks":
            warnings.warn(f"fisher_backend='hooks': module(s) {', '.join(modules)} run more than once per forward "
                          "pass; their parameters use per-example gradients (vmap)", stacklevel=3)
        self._plan = HookPlan(self.model, self.params, self.reducer.needs(), self._served) if self._served else None

    def __call__(self, batch: tuple[Any, Any], batch_index: int, gen: torch.Generator, limit: int) -> list[np.ndarray]:
        """One row per example (at most ``limit``): ``sum_{i in u} g_i^2`` with ``g`` the gradient under a
        label drawn from the model's own predictive distribution (its expectation is the Fisher block
        trace)."""
        inputs, targets = _first(batch, limit)
        rows: list[np.ndarray] = []
        if self._plan is not None and not self.fallback and isinstance(inputs, torch.Tensor | Mapping):
            # The hooks' own forward pass of each chunk gives the logits the labels are drawn from: no
            # separate forward for the labels (a sixth of the cost). The draws are the same as from one
            # forward of the whole batch wherever the model's outputs do not depend on the batch size
            # (multinomial consumes the generator row by row).
            n = len(inputs) if isinstance(inputs, torch.Tensor) else min(limit, len(targets))
            for s in range(0, n, self.chunk):
                part = _rows_of(inputs, s, s + self.chunk, n)
                rows.extend(self._rows(part, _Labels(self.loss_fn, targets[s : s + self.chunk], batch_index, gen)))
            return rows
        sampled = _sample_labels(self.model, self.loss_fn, inputs, targets, batch_index, gen)
        n = len(sampled)
        for s in range(0, n, self.chunk):  # the hooks' activations and transients: ``chunk`` examples at a time
            part = _rows_of(inputs, s, s + self.chunk, n)
            rows.extend(self._rows(part, sampled[s : s + self.chunk]))
        return rows

    def _rows(self, inputs: Any, sampled: torch.Tensor | _Labels) -> list[np.ndarray]:
        while self._plan is not None and not (isinstance(sampled, _Labels) and self.fallback):
            try:
                marg, squares = self._plan(self.loss_fn, inputs, sampled, example_losses(self.loss_fn))
                break
            except _MultiCall as e:
                self._demote(e.modules)
        if isinstance(sampled, _Labels):  # drawn in the hooks' pass, or (after a demotion) by a forward of its own
            sampled = sampled.get(self.model, inputs)
            if self.fallback and self._plan is not None:  # demoted: the hooked pass above did not run
                return self._rows(inputs, sampled)
        if self._plan is None:
            rows: list[np.ndarray] = []
            for g in per_example_grads(self.model, self.loss_fn, self.params, inputs, sampled):
                rows.extend(self.reducer({n: t * t for n, t in g.items()}, batched=True).numpy())
            return rows
        rest = {p: self.params[p] for p in self.fallback}
        if rest:
            for s, g in _offsets(per_example_grads(self.model, self.loss_fn, rest, inputs, sampled)):
                for n, t in g.items():
                    squares[n] = torch.cat([squares[n], t * t]) if s else t * t
        return list(self.reducer.from_parts(marg, squares).numpy())


class _Labels:
    """One chunk's labels, drawn from the logits of the hooks' forward pass when it runs (:class:`HookPlan`
    calls it with the model outputs), else by :meth:`get` from a forward pass of its own."""

    def __init__(self, loss_fn: LossFn, targets: Any, batch_index: int, gen: torch.Generator) -> None:
        self.loss_fn, self.targets, self.batch_index, self.gen = loss_fn, targets, batch_index, gen
        self.sampled: torch.Tensor | None = None

    def __call__(self, outputs: Any) -> torch.Tensor:
        with torch.no_grad():
            self.sampled = _draw_labels(outputs, self.loss_fn, self.targets, self.batch_index, self.gen)
        return self.sampled

    def get(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        if self.sampled is None:
            self.sampled = _sample_labels(model, self.loss_fn, inputs, self.targets, self.batch_index, self.gen)
        return self.sampled


def _rows_of(inputs: Any, start: int, stop: int, n: int) -> Any:
    """Examples ``start:stop`` of a batch of ``n`` (keyword inputs: the keys with one row per example)."""
    if start == 0 and stop >= n:
        return inputs
    if isinstance(inputs, Mapping):
        keys = _batched_keys(inputs, n)
        return {k: (v[start:stop] if k in keys else v) for k, v in inputs.items()}
    return inputs[start:stop]


def _offsets(chunks: Iterable[dict[str, torch.Tensor]]) -> Iterable[tuple[int, dict[str, torch.Tensor]]]:
    s = 0
    for g in chunks:
        yield s, g
        s += len(next(iter(g.values())))


def _first(batch: tuple[Any, Any], limit: int) -> tuple[Any, Any]:
    inputs, targets = batch
    if isinstance(inputs, Mapping):
        keys = _batched_keys(inputs, len(targets))
        inputs = {k: (v[:limit] if k in keys else v) for k, v in inputs.items()}
    else:
        inputs = inputs[:limit]
    return inputs, targets


def _sample_labels(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, batch_index: int,
                   gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return _draw_labels(call_model(model, inputs), loss_fn, targets, batch_index, gen)


def _draw_labels(outputs: Any, loss_fn: LossFn, targets: Any, batch_index: int, gen: torch.Generator) -> torch.Tensor:
    check_loss(loss_fn(outputs, targets[: len(_logits(outputs))]), batch_index)
    logits = _logits(outputs)
    probs = torch.softmax(logits.double(), dim=-1).cpu()  # the generator is a CPU one, on any device
    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
    return sampled.to(device=logits.device, dtype=getattr(targets, "dtype", torch.long))


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
    model's own predictive distribution (its expectation is the Fisher block trace). The ``vmap``
    reference; :class:`FisherSampler` chooses a backend."""
    inputs, targets = _first(batch, limit)
    sampled = _sample_labels(model, loss_fn, inputs, targets, batch_index, gen)
    rows: list[np.ndarray] = []
    for g in per_example_grads(model, loss_fn, params, inputs, sampled):
        rows.extend(reducer({n: t * t for n, t in g.items()}, batched=True).numpy())
    return rows
