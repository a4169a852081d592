"""Brute-force references: full Hessians, Fisher matrices and per-unit element masks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from hap.units import Unit


def unit_params(model: nn.Module, units: list[Unit]) -> tuple[list[str], dict[str, torch.Tensor]]:
    named = dict(model.named_parameters())
    names = sorted({s.param for u in units for s in u.slices})
    return names, {n: named[n] for n in names}


def unit_masks(units: list[Unit], params: dict[str, torch.Tensor], scope: str = "all") -> list[torch.Tensor]:
    """One flat 0/1 mask per unit over the concatenation of ``params`` (in their order)."""
    out = []
    for u in units:
        parts = []
        for n, p in params.items():
            m = torch.zeros(p.shape, dtype=torch.float64)
            for s in u.scoped(scope):
                if s.param == n:
                    m.index_fill_(s.dim, torch.tensor(s.indices), 1.0)
            parts.append(m.flatten())
        out.append(torch.cat(parts))
    return out


def _flat_fn(model, params, x, y, loss_fn=F.cross_entropy):
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat):
        ps, o = {}, 0
        for n, sh, sz in zip(names, shapes, sizes, strict=True):
            ps[n] = flat[o : o + sz].view(sh)
            o += sz
        return loss_fn(functional_call(model, ps, (x,), strict=False), y)

    flat = torch.cat([params[n].detach().flatten() for n in names])
    return f, flat


def full_hessian(model, params, x, y) -> torch.Tensor:
    model.eval()
    f, flat = _flat_fn(model, params, x, y)
    return torch.func.hessian(f)(flat)


def exact_block_traces(model, units, x, y, scope: str = "all") -> torch.Tensor:
    _, params = unit_params(model, units)
    h = full_hessian(model, params, x, y)
    d = h.diagonal()
    return torch.stack([(m * d).sum() for m in unit_masks(units, params, scope)]).detach()


def exact_fisher_traces(model, units, x, y) -> torch.Tensor:
    """Tr(F_uu) with F = mean_n E_{c~p(.|x_n)} g_nc g_nc^T, computed over every class exactly."""
    _, params = unit_params(model, units)
    model.eval()
    masks = unit_masks(units, params)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    total = torch.zeros(len(units), dtype=torch.float64)
    for i in range(x.shape[0]):
        for c in range(probs.shape[1]):
            f, flat = _flat_fn(model, params, x[i : i + 1], torch.tensor([c]))
            g = torch.func.grad(f)(flat)
            total += probs[i, c] * torch.stack([(m * g * g).sum() for m in masks])
    return (total / x.shape[0]).detach()
