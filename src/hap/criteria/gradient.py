"""First-order and empirical-Fisher criteria on the same units as HAP.

- ``taylor``: ``|sum_u g*w|`` per batch, averaged over batches (Molchanov et al.).
- ``obd``: Optimal Brain Damage with the empirical Fisher diagonal, ``1/2 sum_u w^2 E[g^2]``, the expectation
  over *examples* (per-example gradients under the true labels), not the square of a batch-mean
  gradient, which would be biased low by a factor of the batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from .._hf import eager_attention
from .._utils import call_model, check_loss, eval_mode
from ..distributed import all_reduce_sum
from ..estimate.fisher import per_example_grads
from .base import ScoreContext, register_criterion


@register_criterion("taylor", description="first-order Taylor |sum g*w| per batch (Molchanov et al.)")
def taylor(ctx: ScoreContext) -> np.ndarray:
    names = list(ctx.params)
    acc = np.zeros(len(ctx.units))
    with eval_mode(ctx.model):
        for b_i, (x, y) in enumerate(ctx.data):
            loss = ctx.loss_fn(call_model(ctx.model, x), y)
            check_loss(loss, b_i)
            gs = torch.autograd.grad(loss, [ctx.params[n] for n in names], allow_unused=True)
            gw = {n: g * ctx.params[n].detach() for n, g in zip(names, gs, strict=True) if g is not None}
            acc += np.abs(ctx.reducer(gw).numpy())
    # under torch.distributed: the mean over the batches of every rank (each rank's own shard)
    return all_reduce_sum(acc) / all_reduce_sum(len(ctx.data))


@register_criterion("obd", description="Optimal Brain Damage, empirical Fisher from per-example gradients")
def obd(ctx: ScoreContext) -> np.ndarray:
    params = dict(ctx.params)
    sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    with eval_mode(ctx.model), eager_attention(ctx.model):
        for b_i, (x, y) in enumerate(ctx.data):
            with torch.no_grad():
                check_loss(ctx.loss_fn(call_model(ctx.model, x), y), b_i)
            for g in per_example_grads(ctx.model, ctx.loss_fn, params, x, y):
                for n, t in g.items():
                    sq[n] += (t.double() ** 2).sum(0)
                count += next(iter(g.values())).shape[0]
    total = all_reduce_sum(ctx.reducer({n: params[n].detach().double() ** 2 * sq[n] for n in params}).numpy())
    return 0.5 * total / all_reduce_sum(count)  # the expectation over the examples of every rank
