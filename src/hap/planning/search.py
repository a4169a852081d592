"""The search: the number of candidates whose *measured* result meets the target.

The cost of a unit is not constant (a residual channel shrinks every layer that reads it, an implant adds
its own layers), so the planner does not add up per-unit estimates: for a candidate count it asks the
caller's ``measure`` function (which builds the pruned model on a copy and counts it) for the fraction
removed. The sets are nested, so the fraction grows with the count; a bisection needs ``log2(#units)``
measurements, then the closer of the two bracketing counts is kept. If neither is within ``tol`` of the
target the search says so rather than returning a plan that misses it.
"""

from __future__ import annotations

from collections.abc import Callable

from .types import PlanError, Target

__all__ = ["search"]


def search(measure: Callable[[int], float], n_steps: int, target: Target, tol: float, limits: str) -> int:
    """The step count (1..``n_steps``) whose measured fraction removed is nearest ``target.value``.

    Args:
        measure: Fraction removed after ``s`` steps (cached by the caller; ``measure(0) == 0``).
        n_steps: Largest step count allowed.
        target: The goal.
        tol: Largest accepted ``|achieved - target|``.
        limits: Words describing the limits, for the unreachable-target message.

    Raises:
        PlanError: Out of reach, or no count lands within ``tol``.
    """
    if n_steps == 0:
        raise PlanError(
            "nothing can be pruned: every group is excluded, has a single unit, or max_layer_ratio allows none"
        )
    goal = target.value
    top = measure(n_steps)
    if top < goal - tol:
        raise PlanError(
            f"target {target} is unreachable: pruning every allowed unit removes only {top:.3f} "
            f"({limits}); lower the target or relax the limits"
        )
    lo, hi = 0, n_steps
    if top >= goal:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(mid) >= goal:
                hi = mid
            else:
                lo = mid
        best = min((s for s in (lo, hi) if s > 0), key=lambda s: (abs(measure(s) - goal), s))
    else:
        best = n_steps
    if abs(measure(best) - goal) > tol:
        lower = measure(lo) if lo > 0 else 0.0
        raise PlanError(
            f"target {target} cannot be met within ±{tol}: the nearest plans remove {lower:.4f} and "
            f"{measure(hi):.4f} (one more unit is a large step here); use a smaller round_to, a larger tol, "
            "or a nearby target"
        )
    return best
