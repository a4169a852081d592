"""What a prunable unit is, independent of where it comes from: parameter slices, units, unit families.

A *unit* is a list of parameter slices ``(parameter name, dim, indices)`` that disappear together. The
estimators, criteria and the planner see only units, so they work the same for CNN channels, attention
heads or any family registered here. A :class:`UnitFamily` knows how to find its units in a model, how
to remove them physically, and what context estimation needs (e.g. eager attention); families are
registered by unit kind, and an unknown kind anywhere is an error, never a silent drop.

This module imports neither Torch-Pruning nor transformers: families that need them live in their own
modules (:mod:`hap.units.channels`, :mod:`hap.units.heads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

from ..config import Registry

__all__ = [
    "ROLE_IN",
    "ROLE_OUT",
    "ParamSlice",
    "Unit",
    "UnsupportedLayerError",
    "UnitFamily",
    "register_family",
    "unregister_family",
    "get_family",
    "family_for_kind",
    "families",
    "FAMILIES",
]

# Roles say on which side of a layer a slice sits: "out" is the producer of the channel (its filter,
# its BatchNorm entry), "in" is a consumer (the next layer's input columns). The reference HAP code
# scored only the producer side; the "scope" option of the engine picks either.
ROLE_OUT = "out"
ROLE_IN = "in"


class UnsupportedLayerError(ValueError):
    """A layer in a dependency group whose parameter slicing we do not handle."""


@dataclass(frozen=True)
class ParamSlice:
    """All entries of parameter ``param`` whose coordinate along ``dim`` is in ``indices``."""

    param: str
    dim: int
    indices: tuple[int, ...]
    role: str = ROLE_OUT

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "dim": self.dim, "indices": list(self.indices), "role": self.role}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamSlice:
        return cls(str(d["param"]), int(d["dim"]), tuple(int(i) for i in d["indices"]), str(d.get("role", ROLE_OUT)))


@dataclass(frozen=True)
class Unit:
    """One prunable structure: channel ``index`` of group ``group`` (or head ``index`` of a layer)."""

    group: str
    index: int
    slices: tuple[ParamSlice, ...]
    kind: str = "channel"

    @property
    def name(self) -> str:
        return f"{self.group}[{self.index}]"

    def scoped(self, scope: str) -> tuple[ParamSlice, ...]:
        """Slices within ``scope``: ``"all"`` (everything removed with the unit) or ``"producer"``."""
        if scope == "all":
            return self.slices
        if scope == "producer":
            return tuple(s for s in self.slices if s.role == ROLE_OUT)
        raise ValueError(f"unknown scope {scope!r}: use 'all' or 'producer'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "index": self.index,
            "kind": self.kind,
            "slices": [s.to_dict() for s in self.slices],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Unit:
        return cls(
            str(d["group"]),
            int(d["index"]),
            tuple(ParamSlice.from_dict(s) for s in d["slices"]),
            str(d.get("kind", "channel")),
        )



@runtime_checkable
class UnitFamily(Protocol):
    """One kind of prunable structure (channels, attention heads, ...).

    Attributes:
        name: What users pass as ``units=`` (``"channels"``).
        kind: The ``Unit.kind`` / ``GroupPlan.kind`` its units carry (``"channel"``).
    """

    name: str
    kind: str

    def discover(self, model: nn.Module, example_inputs: Any, exclude: Sequence[str] = ()) -> list[Unit]:
        """All units of ``model``, grouped (consecutive units share ``group``), indices ``0..n-1`` per group."""
        ...

    def apply(self, model: nn.Module, removed: Mapping[str, Sequence[int]], example_inputs: Any) -> None:
        """Remove ``{group: [unit index, ...]}`` from ``model`` physically, in place."""
        ...

    def estimation_context(self, model: nn.Module) -> ContextManager[Any]:
        """Context the estimators run in (e.g. eager attention for second derivatives)."""
        ...


FAMILIES: Registry[UnitFamily] = Registry("units")
_BY_KIND: dict[str, str] = {}


def register_family(family: UnitFamily, *, replace: bool = False) -> UnitFamily:
    """Register ``family`` under its ``name`` (its units' ``kind`` is looked up through it too)."""
    if not replace and family.kind in _BY_KIND:
        raise ValueError(f"unit kind {family.kind!r} is already registered by family {_BY_KIND[family.kind]!r}")
    FAMILIES.register(family.name, family, replace=replace)
    _BY_KIND[family.kind] = family.name
    return family


def unregister_family(name: str) -> None:
    fam = FAMILIES.get(name)
    FAMILIES.unregister(name)
    _BY_KIND.pop(fam.kind, None)


def get_family(name: str) -> UnitFamily:
    """The family users call ``name`` (``units="channels"``)."""
    return FAMILIES.get(name)


def family_for_kind(kind: str) -> UnitFamily:
    """The family whose units have ``kind``; an unknown kind is a ``ValueError`` (never dropped)."""
    if kind not in _BY_KIND:
        raise ValueError(
            f"no unit family handles units of kind {kind!r} (registered kinds: {', '.join(_BY_KIND) or 'none'}): "
            "register one with hap.units.register_family"
        )
    return FAMILIES.get(_BY_KIND[kind])


def families() -> list[UnitFamily]:
    """Registered families, in registration order (surgery applies them in this order)."""
    return [f for _, f in FAMILIES.items()]
