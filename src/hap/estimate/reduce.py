"""Per-unit sums of per-parameter tensors, for all units at once.

Every quantity the engine needs is a sum over a unit's elements of some elementwise tensor: the
Hutchinson term ``v * Hv``, the squared weights, the count of weights, ``|w|``, ``g * w``, ``w**2 * g**2``.
This module precomputes, once, which slice of which parameter feeds which unit, so that each later
reduction is a handful of ``sum`` + ``index_add_`` calls instead of a Python loop over units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..units.base import Unit

__all__ = ["UnitReducer"]


class UnitReducer:
    """Sums tensors shaped like the model's parameters over each unit's elements.

    A unit's slices on one parameter usually lie along a single dim (a filter's rows, or the consumer's
    columns): then summing the tensor over all other dims gives one number per index and a gather-add
    finishes the job. A unit can hold slices of the *same* parameter along two dims (a layer whose input
    and output channels are coupled by a residual add around it, ``x + conv(x)``); its rows and columns
    overlap, so those units use an explicit element mask to count each element exactly once.

    Args:
        units: The units, in output order.
        shapes: Shape of every parameter the units name.
        scope: ``"all"`` slices of each unit or only the ``"producer"`` ones.
    """

    def __init__(self, units: Sequence[Unit], shapes: Mapping[str, torch.Size], scope: str = "all") -> None:
        self.num_units = len(units)
        self.shapes = dict(shapes)
        pos: dict[tuple[str, int], list[int]] = {}
        uid: dict[tuple[str, int], list[int]] = {}
        masks: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for u_i, unit in enumerate(units):
            by_param: dict[str, dict[int, set[int]]] = {}
            for s in unit.scoped(scope):
                if s.param not in self.shapes:
                    raise ValueError(
                        f"unit {unit.name} names parameter '{s.param}' that the model does not have: "
                        "the units come from a different model"
                    )
                shape = self.shapes[s.param]
                if not 0 <= s.dim < len(shape) or any(not 0 <= i < shape[s.dim] for i in s.indices):
                    raise ValueError(
                        f"unit {unit.name} slices '{s.param}' (shape {tuple(shape)}) out of range along dim "
                        f"{s.dim}: the units come from a different model"
                    )
                by_param.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.indices)
            for p, dims in by_param.items():
                if len(dims) == 1:
                    ((d, idx),) = dims.items()
                    pos.setdefault((p, d), []).extend(sorted(idx))
                    uid.setdefault((p, d), []).extend([u_i] * len(idx))
                else:
                    mask = torch.zeros(self.shapes[p], dtype=torch.bool)
                    for d, idx in dims.items():
                        mask.index_fill_(d, torch.tensor(sorted(idx)), True)
                    masks.setdefault(p, []).append((u_i, mask))
        self._sliced = [
            (p, d, torch.tensor(pos[(p, d)], dtype=torch.long), torch.tensor(uid[(p, d)], dtype=torch.long))
            for (p, d) in sorted(pos)
        ]
        self._masks = masks
        self.params = sorted({p for p, _ in pos} | set(masks))

    def __call__(self, tensors: Mapping[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Per-unit sums, float64, shape ``[U]`` (or ``[K, U]`` when ``batched``: leading dim K).

        Parameters the units do not name are ignored; a named parameter missing from ``tensors``
        counts as zero (e.g. the part of a probe vector that a partition switched off).
        """
        lead = ()
        dev = torch.device("cpu")
        for t in tensors.values():
            lead = tuple(t.shape[:1]) if batched else ()
            dev = t.device
            break
        # reduced where the tensors are (a GPU's per-example gradients never travel), returned on the CPU
        out = torch.zeros(*lead, self.num_units, dtype=torch.float64, device=dev)
        off = 1 if batched else 0
        for p, d, pos, uid in self._sliced:
            x = tensors.get(p)
            if x is None:
                continue
            x = x.detach().to(torch.float64)
            x = x.movedim(d + off, off)
            r = x.reshape(*lead, x.shape[off], -1).sum(-1)
            out.index_add_(off, uid.to(dev), r.index_select(off, pos.to(dev)))
        for p, items in self._masks.items():
            x = tensors.get(p)
            if x is None:
                continue
            x = x.detach().to(torch.float64)
            for u_i, mask in items:
                m = mask.to(x.device)
                out[..., u_i] += x[..., m].sum(-1) if batched else x[m].sum()
        return out.cpu()

    def needs(self) -> dict[str, tuple[set[int], bool]]:
        """What each parameter must provide: ``{param: (dims, full)}``.

        A parameter whose units slice it along one dim each needs only per-index sums along those dims
        (``dims``); one that a unit slices along two dims at once (the overlapping rows and columns of an
        ``x + conv(x)`` layer) needs the full elementwise tensor (``full``).
        """
        out: dict[str, tuple[set[int], bool]] = {}
        for p, d, _, _ in self._sliced:
            out.setdefault(p, (set(), False))[0].add(d)
        for p in self._masks:
            out[p] = (out.get(p, (set(), False))[0], True)
        return out

    def from_parts(self, marginals: Mapping[tuple[str, int], torch.Tensor],
                   tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Batched per-unit sums ``[K, U]`` from per-index marginals and/or full tensors.

        ``marginals[(p, d)]`` (shape ``[K, shape[d]]``) is the sum of the tensor over every dim of ``p``
        but ``d``, which is all a single-dim slice needs; ``tensors`` holds full ``[K, *shape]`` tensors
        for the rest (and for every parameter :meth:`needs` says needs them). A parameter in neither
        counts as zero.
        """
        out = self(tensors, batched=True) if tensors else None
        for p, d, pos, uid in self._sliced:
            r = marginals.get((p, d))
            if r is None or p in tensors:
                continue
            r = r.detach().to("cpu", torch.float64)  # [K, size]: small enough to move
            if out is None:
                out = torch.zeros(r.shape[0], self.num_units, dtype=torch.float64)
            out.index_add_(1, uid, r.index_select(1, pos))
        if out is None:
            raise ValueError("from_parts needs at least one marginal or tensor")
        return out

    def counts(self) -> torch.Tensor:
        """Number of weights in each unit (``n_u``)."""
        return self({p: torch.ones(s) for p, s in self.shapes.items()})
