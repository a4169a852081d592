"""What the allocator must know about each group, read off the model and its sensitivity.

The planner's inputs that depend on the network rather than on the scores: which groups an excluded layer
freezes, which can carry an implant (and from which groups their input channels come), which units of a group
belong to one producer (a concat's branches: one of each must stay), and how many weights each unit's removal
deletes (for ``rank_by="score_per_param"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch.nn as nn

from .implant import implant_block_reason, implant_unsupported_reason
from .planning.allocation import GroupInfo

if TYPE_CHECKING:
    from .sensitivity import Sensitivity

__all__ = ["group_infos", "unit_weights", "excluded_modules"]


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def group_infos(model: nn.Module, sens: Sensitivity, excluded: set[str], implant: str | None) -> dict[str, GroupInfo]:
    """Per group: its kind, whether an excluded layer freezes it, and whether (and how) it can be implanted."""
    named = dict(model.named_modules())
    by_group = sens.by_group()
    infos: dict[str, GroupInfo] = {}
    for name, us in by_group.items():
        if name not in named:
            raise ValueError(f"the sensitivity names layer '{name}' that the model lacks: recompute it on this model")
        kind = us[0].unit.kind
        touched = {_module_of(s.param) for u in us for s in u.slices}
        producers: dict[str, set[int]] = {}  # output rows of one parameter: which of the group's units hold them
        for u in us:
            for s in u.slices:
                if s.role == "out" and s.dim == 0:
                    producers.setdefault(s.param, set()).add(u.index)
        partial = {frozenset(v) for v in producers.values() if len(v) < len(us)}
        info = GroupInfo(kind=kind, frozen=", ".join(sorted(touched & excluded)),
                         keep_one_of=sorted(partial, key=sorted))
        if implant is not None and kind == "channel":  # heads are removed outright: no cheaper head to implant
            root = named[name]
            why = implant_unsupported_reason(root, implant)
            if why is not None:
                why = f"'{name}': {why}"
            else:
                members = {(_module_of(s.param), s.role) for u in us for s in u.slices}
                why = implant_block_reason(name, [(m, named.get(m), role) for m, role in sorted(members)])
            if why is None:
                info.implant = implant
                info.kernel_numel = math.prod(root.kernel_size)
                info.in_channels = root.in_channels
                info.pointwise_ok = implant_unsupported_reason(root, "pointwise") is None
            else:
                info.implant_note = why
        infos[name] = info
    # which channels of which group feed each implantable root (its input width after pruning)
    gindex = {n: i for i, n in enumerate(by_group)}
    roots = {f"{n}.weight": n for n, info in infos.items() if info.implant is not None}
    if roots:
        for u in sens.units:
            for s in u.slices:
                g = roots.get(s.param)
                if g is not None and s.role == "in" and s.dim == 1:
                    key = (gindex[u.group], u.index)
                    infos[g].inputs_from[key] = infos[g].inputs_from.get(key, 0) + len(s.indices)
    return infos


def unit_weights(model: nn.Module, sens: Sensitivity) -> np.ndarray:
    """Weights each unit's removal deletes (all its slices; an element on two slices counted twice)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = np.zeros(len(sens.units))
    for i, u in enumerate(sens.units):
        for s in u.slices:
            shape = shapes[s.param]
            out[i] += len(s.indices) * math.prod(shape) / shape[s.dim]
    return out


def excluded_modules(model: nn.Module, exclude: Sequence[str | nn.Module]) -> set[str]:
    names = {m: n for n, m in model.named_modules()}
    out: set[str] = set()
    for e in exclude or ():
        if isinstance(e, nn.Module):
            if e not in names:
                raise ValueError(f"exclude holds a {type(e).__name__} that is not part of the model")
            out.add(names[e])
        elif isinstance(e, str) and e in dict(model.named_modules()):
            out.add(e)
        else:
            raise ValueError(f"exclude names a layer {e!r} that the model does not have")
    return out
