"""Magnitude criteria: group L1 (``|w|`` summed over the unit) and L2 (``w**2``), as Torch-Pruning's
``MagnitudeImportance`` with group reduction ``sum``; and seeded random scores, the floor every
criterion must clear. None of them reads data."""

from __future__ import annotations

import numpy as np

from .base import ScoreContext, register_criterion


@register_criterion("l1", needs_data=False, aliases=("magnitude",), description="sum of |w| over the unit")
def l1(ctx: ScoreContext) -> np.ndarray:
    return ctx.reducer({n: p.detach().abs() for n, p in ctx.params.items()}).numpy()


@register_criterion("l2", needs_data=False, description="sum of w^2 over the unit")
def l2(ctx: ScoreContext) -> np.ndarray:
    return ctx.reducer({n: p.detach() ** 2 for n, p in ctx.params.items()}).numpy()


@register_criterion("random", needs_data=False, description="seeded uniform noise (the floor)")
def random_scores(ctx: ScoreContext) -> np.ndarray:
    return np.random.default_rng(ctx.config.seed).random(len(ctx.units))
