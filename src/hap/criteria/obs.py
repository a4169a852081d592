"""Compensation-aware criteria: the structured OBS cost on the consumers' layer Hessians ``H = XᵀX``.

A unit's score is what the reconstruction error of the layers that *read* it grows by when it goes and
the remaining inputs compensate by least squares (``w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G`` per consumer, summed over the
consumers): exactly what :func:`hap.repair` can and cannot recover. Magnitude or curvature scores ignore
that compensation, which is why, after repair, L1 beat HAP's trace in the prototype (DESIGN.md §4).

- ``obs``: every unit's cost alone, from one ``H⁻¹`` per consumer layer.
- ``obs-greedy``: inside each group, units are removed one at a time (the cheapest given those already
  gone, ``H⁻¹`` and the weights updated after each removal, jointly over all consumers of the group); a
  unit's score is the cumulative cost at its removal step, so the order inside a group is the greedy
  order and the planner's within-group choice follows it (meant for ``allocation="uniform"``, where
  groups are never compared with each other).

``H`` comes from the calibration batches (the ``max_batches`` given to :func:`hap.sensitivity`), in
float64, damped by 1% of its mean diagonal (as repair). Padding tokens are dropped for keyword inputs
with an ``attention_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._utils import call_model, eval_mode
from ..distributed import all_reduce_sum
from ..repair.lsq import unfold_inputs
from ..repair.obs import group_cost, spd_inverse
from ..units._sliced import is_conv1d
from .base import ScoreContext, register_criterion

__all__ = ["consumer_columns", "layer_hessians"]

DAMPING = 0.01


def consumer_columns(model: nn.Module, units: list[Any]) -> dict[str, dict[int, list[int]]]:
    """``{consumer layer: {unit position: [unfolded input columns]}}`` for every Linear / ungrouped conv
    that reads a unit (its input-side slices on the layer's weight)."""
    named = dict(model.named_modules())
    out: dict[str, dict[int, list[int]]] = {}
    for pos, u in enumerate(units):
        for s in u.slices:
            mname, _, pname = s.param.rpartition(".")
            m = named.get(mname)
            if s.role == "in" and pname == "weight" and s.dim == 0 and is_conv1d(m):
                cols = list(s.indices)  # GPT-2's Conv1D: weight (in, out), a Linear's columns are its rows
                out.setdefault(mname, {}).setdefault(pos, []).extend(cols)
                continue
            if s.role != "in" or pname != "weight" or s.dim != 1:
                continue
            if isinstance(m, nn.Linear):
                cols = list(s.indices)
            elif isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups == 1 and not m.transposed:
                k = math.prod(m.kernel_size)
                cols = [c * k + j for c in s.indices for j in range(k)]
            else:
                continue
            out.setdefault(mname, {}).setdefault(pos, []).extend(cols)
    return out


def _rows_mask(inputs: Any) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def layer_hessians(model: nn.Module, layers: list[str], data: list[tuple[Any, Any]]) -> dict[str, torch.Tensor]:
    """Damped float64 ``H = XᵀX`` of each layer's (unfolded) inputs over ``data``, the model in eval mode."""
    named = dict(model.named_modules())
    acc: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = current["mask"]
            linear = isinstance(mod, nn.Linear) or is_conv1d(mod)
            if linear and mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            rows = (x.reshape(-1, x.shape[-1]) if is_conv1d(mod) else unfold_inputs(mod, x)).double()
            h = rows.T @ rows
            acc[name] = h if name not in acc else acc[name] + h
        return fn

    handles = [named[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        with eval_mode(model), torch.no_grad():
            for x, _ in data:
                current["mask"] = _rows_mask(x)
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, h in acc.items():
        h = all_reduce_sum(h)  # under torch.distributed: X^T X over every rank's batches
        lam = DAMPING * float(h.diagonal().mean().clamp_min(1e-12))
        out[n] = h + lam * torch.eye(len(h), dtype=h.dtype)
    return out


def _problems(ctx: ScoreContext) -> tuple[dict[str, dict[int, list[int]]], dict[str, torch.Tensor],
                                             dict[str, torch.Tensor]]:
    """Consumer columns of every unit, and each consumer's damped ``H`` and weight matrix."""
    cols = consumer_columns(ctx.model, list(ctx.units))
    hs = layer_hessians(ctx.model, list(cols), list(ctx.data))
    named = dict(ctx.model.named_modules())
    ws = {n: (named[n].weight.detach().double().T if is_conv1d(named[n])  # Conv1D stores (in, out)
              else named[n].weight.detach().double().reshape(named[n].weight.shape[0], -1)) for n in cols}
    return cols, hs, ws


@register_criterion("obs", options=("max_batches",), description="structured OBS: consumers' reconstruction-error "
                    "increase after least-squares compensation")
def obs(ctx: ScoreContext) -> np.ndarray:
    cols, hs, ws = _problems(ctx)
    scores = np.zeros(len(ctx.units))
    for layer, by_unit in cols.items():
        if layer not in hs:
            continue  # never reached by the forward pass
        hinv = spd_inverse(hs[layer])
        for pos, c in by_unit.items():
            scores[pos] += float(group_cost(hinv, ws[layer], torch.tensor(sorted(set(c)))))
    return scores


@register_criterion("obs-greedy", options=("max_batches",), description="greedy structured OBS inside each group "
                    "(H^-1 and weights updated after each removal)")
def obs_greedy(ctx: ScoreContext) -> np.ndarray:
    cols, hs, ws = _problems(ctx)
    members: dict[str, list[int]] = {}
    for pos, u in enumerate(ctx.units):
        members.setdefault(u.group, []).append(pos)
    scores = np.zeros(len(ctx.units))
    for positions in members.values():
        layers = sorted({layer for layer, by in cols.items() if layer in hs and any(p in by for p in positions)})
        state = {layer: [spd_inverse(hs[layer]), ws[layer].clone()] for layer in layers}
        idx = {(layer, p): torch.tensor(sorted(set(cols[layer][p]))) for layer in layers for p in positions
               if p in cols[layer]}
        remaining = list(positions)
        total = 0.0
        while remaining:
            costs = [sum(float(group_cost(state[layer][0], state[layer][1], idx[(layer, p)]))
                         for layer in layers if (layer, p) in idx) for p in remaining]
            k = int(np.argmin(costs))
            p = remaining.pop(k)
            total += costs[k]
            scores[p] = total
            if not remaining:
                break
            for layer in layers:
                g = idx.get((layer, p))
                if g is None:
                    continue
                hinv, w = state[layer]
                m_inv = torch.linalg.inv(hinv.index_select(0, g).index_select(1, g))
                rows = hinv.index_select(0, g)
                w -= (w.index_select(1, g) @ m_inv) @ rows
                hinv -= rows.T @ m_inv @ rows
                w[:, g] = 0
                hinv[g, :] = 0
                hinv[:, g] = 0
    return scores
