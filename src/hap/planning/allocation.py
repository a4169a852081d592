"""Allocation: from per-unit scores to nested candidate sets, and from a candidate count to group plans.

Pure data in, pure data out: the model enters only through :class:`GroupInfo` records the caller
(:func:`hap.plan`) builds, so planning never imports model or surgery code.

Candidate sets are nested, one unit more per step: step ``s`` prunes the first ``s`` units of one
sequence. ``"global"`` orders all units by score (the paper's); ``"uniform"`` by the ratio a unit's group
reaches when it goes (the ``j``-th least sensitive of ``n`` goes at ratio ``j/n``), then by score, so every
prefix keeps all groups within one unit of the same ratio while the search can still stop between ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import ALLOCATIONS, RANKINGS
from .types import GroupPlan

__all__ = ["GroupInfo", "Candidates", "candidates", "layer_normalized", "materialize", "ALLOCATIONS", "RANKINGS"]


@dataclass
class GroupInfo:
    """What the allocator needs to know about one group of the model (measured by the caller).

    Attributes:
        kind: The units' kind (``"channel"``, ``"head"``, ...).
        frozen: Why the group may not be touched (an excluded layer), or ``""``.
        implant: Implant kind the group can carry, or ``None``.
        implant_note: Why it cannot, when an implant was asked for.
        kernel_numel: ``k*k`` of the root conv (implantable groups).
        in_channels: Input channels of the root conv (implantable groups).
        pointwise_ok: A low-rank group too expensive for rank 1 may fall back to a pointwise implant.
        inputs_from: Input channels of this group's root fed by channel ``i`` of group ``h``: ``{(h, i): count}``.
        keep_one_of: Sets of this group's unit indices of which at least one must stay: the units whose output
            rows one producer holds, when the group spans several (two convs concatenated into one consumer
            form one group; removing every unit of one of them would leave a layer with no output).
    """

    kind: str
    frozen: str = ""
    implant: str | None = None
    implant_note: str = ""
    kernel_numel: int = 1
    in_channels: int = 0
    pointwise_ok: bool = False
    inputs_from: dict[tuple[int, int], int] = field(default_factory=dict)
    keep_one_of: list[frozenset[int]] = field(default_factory=list)


@dataclass
class _Group:
    name: str
    order: list[int]  # unit indices, least sensitive first
    cap: int  # most units that may leave
    info: GroupInfo
    note: str


@dataclass
class Candidates:
    """The nested candidate sets: ``step_group[s]`` is the group whose next unit step ``s+1`` adds."""

    groups: list[_Group]
    step_group: np.ndarray

    @property
    def n_steps(self) -> int:
        return len(self.step_group)

    def counts_at(self, s: int) -> np.ndarray:
        return np.bincount(self.step_group[:s], minlength=len(self.groups))

    def limits_text(self, max_layer_ratio: float) -> str:
        frozen = sum(1 for g in self.groups if g.cap == 0)
        return (f"max_layer_ratio={max_layer_ratio}, one unit kept per group, {frozen} of {len(self.groups)} "
                "groups frozen")


def layer_normalized(group_of: Sequence[str], scores: np.ndarray) -> np.ndarray:
    """Each group's scores divided by their L2 norm (Michel et al.'s per-layer normalisation).

    Only the global ranking changes: the order inside a group is kept. Layers whose scores are all
    small (e.g. the last layers of a transformer, whose per-head curvature is low) then compete on
    equal terms instead of being emptied first.
    """
    out = scores.astype(np.float64).copy()
    members: dict[str, list[int]] = {}
    for pos, g in enumerate(group_of):
        members.setdefault(g, []).append(pos)
    for idx in members.values():
        norm = float(np.linalg.norm(out[idx]))
        if norm > 0:
            out[idx] /= norm
    return out


def _last_of_each(order: Sequence[int], sets: Sequence[frozenset[int]]) -> set[int]:
    """Units to protect so that every set keeps one: for each set (smallest first) without a protected unit
    yet, its most important unit (last in ``order``)."""
    rank = {c: i for i, c in enumerate(order)}
    kept: set[int] = set()
    for members in sorted(sets, key=len):
        if members and not members & kept:
            kept.add(max(members, key=rank.__getitem__))
    return kept


def candidates(
    units: Sequence[tuple[str, int]],
    scores: np.ndarray,
    infos: Mapping[str, GroupInfo],
    *,
    allocation: str,
    max_layer_ratio: float,
) -> tuple[Candidates, list[list[int]]]:
    """Order the units into nested candidate sets.

    Args:
        units: ``(group, index)`` of every unit, in the sensitivity's order.
        scores: Ranking score per unit (larger: more important).
        infos: Per group, from the caller.
        allocation: ``"global"`` or ``"uniform"``.
        max_layer_ratio: At most this share of a group may go (one unit always stays).

    Returns:
        The candidates and, per group, the positions of its units (by index) in ``units``.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    by_group: dict[str, dict[int, int]] = {}
    for pos, (g, i) in enumerate(units):
        slot = by_group.setdefault(g, {})
        if i in slot:
            raise ValueError(f"the sensitivity lists unit {g}[{i}] twice: recompute it")
        slot[i] = pos
    groups: list[_Group] = []
    units_by_group: list[list[int]] = []
    for name, idx in by_group.items():
        if sorted(idx) != list(range(len(idx))):
            raise ValueError(f"group '{name}' of the sensitivity is missing units: recompute the sensitivity")
        pos = [idx[c] for c in range(len(idx))]
        units_by_group.append(pos)
        size = len(pos)
        info = infos[name]
        order = sorted(range(size), key=lambda c, pos=pos: (float(scores[pos[c]]), c))
        kept = _last_of_each(order, info.keep_one_of)  # never removed: last in the order, beyond the cap
        order = [c for c in order if c not in kept] + [c for c in order if c in kept]
        cap = 0 if info.frozen else min(size - max(1, len(kept)), math.floor(max_layer_ratio * size + 1e-9))
        note = f"excluded ({info.frozen})" if info.frozen else (f"no implant: {info.implant_note}"
                                                                if info.implant_note else "")
        groups.append(_Group(name, order, cap, info, note))
    sizes = np.array([len(u) for u in units_by_group])

    def key(gi: int, j: int) -> tuple[float, ...]:
        score = float(scores[units_by_group[gi][groups[gi].order[j]]])
        if allocation == "global":
            return (score, gi, j)
        return ((j + 1) / sizes[gi], score, gi)

    entries = sorted((key(gi, j), gi) for gi, g in enumerate(groups) for j in range(g.cap))
    return Candidates(groups, np.array([gi for _, gi in entries], dtype=np.int64)), units_by_group


def materialize(
    cands: Candidates,
    counts: np.ndarray,
    *,
    implant_fraction: float,
    implant_cost: float,
    round_to: int,
    lowrank_rank: Callable[[int, int, int, float], int],
) -> list[GroupPlan]:
    """Group plans for ``counts[g]`` pruned candidates per group (rounding, implant split, ranks).

    ``lowrank_rank(n, in_channels, kernel_numel, cost)`` gives the rank of a low-rank implant (passed in
    so that this module stays free of implant code).
    """
    groups = cands.groups
    cand_counts: list[int] = []
    n_imp: list[int] = []
    for g, c in zip(groups, counts, strict=True):
        size = len(g.order)
        c = int(c)
        k = math.floor(implant_fraction * c + 0.5) if g.info.implant is not None else 0
        if c > 0 and round_to > 1:
            # the layer's output width (kept + implanted) is what the consumers see: round it up by
            # removing fewer (the most sensitive of the removed stay)
            width = min(size, math.ceil((size - (c - k)) / round_to) * round_to)
            c = size - width + k
        cand_counts.append(c)
        n_imp.append(k)
    removed_sets = [set(g.order[: c - k]) for g, c, k in zip(groups, cand_counts, n_imp, strict=True)]
    out = []
    for g, c, k in zip(groups, cand_counts, n_imp, strict=True):
        kind, rank, note = (g.info.implant if k else None), None, g.note
        if kind == "lowrank":
            cin = g.info.in_channels - sum(n for (h, i), n in g.info.inputs_from.items() if i in removed_sets[h])
            rank = lowrank_rank(k, cin, g.info.kernel_numel, implant_cost)
            if rank == 0 and g.info.pointwise_ok:
                kind, rank = "pointwise", None
                note = "rank 1 costs more than implant_cost for so few channels: pointwise implant"
            elif rank == 0:
                kind, rank, k = None, None, 0
                note = "rank 1 costs more than implant_cost and a 1x1 conv cannot align: removed instead"
        removed = sorted(g.order[: c - k])
        implanted = sorted(g.order[c - k : c])
        kept = sorted(g.order[c:])
        kind = kind if implanted else None
        out.append(GroupPlan(g.name, len(g.order), kept, implanted, removed, kind, rank, note, g.info.kind))
    return out
