"""The criterion registry: every way of scoring units, registered once with what it needs.

A criterion is a function from a :class:`ScoreContext` (model, loss, materialised batches, units, the
unit parameters and their per-unit reducer, the resolved :class:`hap.config.SensitivityConfig`) to one
float64 score per unit, larger meaning more important, optionally with the evidence of an estimator
(:class:`CriterionResult`). Registering it (:func:`register_criterion`) states the unit kinds it can
score, whether it reads data, and which options of the config it uses; the CLI's choices and help text,
:func:`hap.sensitivity`'s validation and the tests that iterate the registry all come from here, so a
new criterion is one function and one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import Registry, SensitivityConfig
from ..estimate.reduce import UnitReducer
from ..units.base import Unit

__all__ = ["ScoreContext", "CriterionResult", "Criterion", "register_criterion", "get", "names", "REGISTRY"]


@dataclass
class ScoreContext:
    """What a criterion may read. Nothing in it is to be modified.

    Attributes:
        model: The network (in the caller's mode; criteria that run it use eval mode themselves).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        data: Materialised ``(inputs, targets)`` batches (empty for criteria that need none).
        units: The units to score, in output order.
        params: The parameters the units name, by qualified name (the live tensors).
        reducer: Sums any parameter-shaped tensor over every unit at once.
        config: The resolved options.
        counts: ``n_u``, weights per unit (within the scope).
        sq_norms: ``||w_u||^2`` per unit (within the scope).
        progress: Whether to show progress bars.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], torch.Tensor]
    data: Sequence[tuple[Any, Any]]
    units: Sequence[Unit]
    params: Mapping[str, torch.Tensor]
    reducer: UnitReducer
    config: SensitivityConfig
    counts: np.ndarray
    sq_norms: np.ndarray
    progress: bool = True


@dataclass
class CriterionResult:
    """Scores plus, for estimators, how far to trust them (see :class:`hap.Sensitivity`)."""

    scores: np.ndarray
    trace: np.ndarray | None = None
    trace_se: np.ndarray | None = None
    samples: int = 0
    batches: int = 0
    converged: bool = True
    stop_reason: str = "single pass"
    split_half: float = math.nan
    median_rel_se: float = math.nan
    settings: dict[str, Any] = field(default_factory=dict)


ScoreFn = Callable[[ScoreContext], "CriterionResult | np.ndarray"]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion.

    Attributes:
        name: Its registered name (``method=`` of :func:`hap.sensitivity`).
        score: The scoring function.
        unit_kinds: Unit kinds it can score (``None``: any).
        needs_data: Whether it reads batches (magnitude and random do not).
        options: Fields of :class:`~hap.config.SensitivityConfig` it reads besides ``seed``/``scope``;
            they are recorded in the sensitivity's settings so the estimate can be rerun.
        description: One line for ``--help``.
    """

    name: str
    score: ScoreFn
    unit_kinds: tuple[str, ...] | None = None
    needs_data: bool = True
    options: tuple[str, ...] = ()
    description: str = ""

    def supports(self, kind: str) -> bool:
        return self.unit_kinds is None or kind in self.unit_kinds


REGISTRY: Registry[Criterion] = Registry("method")


def register_criterion(
    name: str,
    score: ScoreFn | None = None,
    *,
    unit_kinds: Sequence[str] | None = None,
    needs_data: bool = True,
    options: Sequence[str] = (),
    description: str = "",
    aliases: Sequence[str] = (),
    replace: bool = False,
) -> Any:
    """Register ``score`` as criterion ``name`` (also usable as a decorator when ``score`` is omitted).

    Raises:
        ValueError: ``name`` is taken (pass ``replace=True``), or ``options`` names a field the config
            does not have.
    """
    known = set(SensitivityConfig.defaults())
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"criterion {name!r} reads unknown option(s) {bad}; SensitivityConfig has {sorted(known)}")

    def add(fn: ScoreFn) -> ScoreFn:
        crit = Criterion(name, fn, None if unit_kinds is None else tuple(unit_kinds), needs_data, tuple(options),
                         description)
        REGISTRY.register(name, crit, aliases=tuple(aliases), replace=replace)
        return fn

    if score is None:
        return add
    add(score)
    return REGISTRY.get(name)


def get(name: str) -> Criterion:
    """The criterion registered as ``name`` (or an alias). Raises ``ValueError`` naming the choices."""
    return REGISTRY.get(name)


def names(unit_kind: str | None = None, *, with_aliases: bool = False) -> list[str]:
    """Registered criterion names, optionally only those that can score ``unit_kind`` units."""
    out = REGISTRY.names(with_aliases=with_aliases)
    if unit_kind is None:
        return out
    return [n for n in out if REGISTRY.get(n).supports(unit_kind)]
