"""Apply a :class:`hap.PruningPlan`: physically smaller tensors, plus Neural Implants where planned.

Three passes over one model:

1. **Remove.** Every unit family in the plan removes its units (:meth:`hap.units.UnitFamily.apply`), in
   the families' registration order: channels through Torch-Pruning's dependency graph (the root layer
   and every layer coupled to it: BatchNorm entries, consumers' input columns, across residual adds,
   concatenations, flattens and depthwise convs), attention heads by their own slicing. A plan group of a
   kind no family handles is an error, never silently skipped.
2. **Reorder** (groups with implants). On a graph traced again on the smaller model, the group's
   surviving channels are permuted so the kept ones come first and the implanted ones last: the root's
   filters, the BatchNorm entries and running statistics, and every consumer's input columns, with
   Torch-Pruning's own index mapping telling where each channel lands behind a concat or flatten.
   A consistent permutation of a group leaves the network's function unchanged.
3. **Implant.** The root conv becomes ``ImplantedConv(kept filters, implant)`` whose output
   ``cat([kept, implanted])`` is already in the order the consumers now expect.

Which groups may carry implants is one rule (:func:`hap.implant.implant_block_reason`), applied by the
planner on the units' slices and checked here again on the traced graph, so a hand-edited plan that asks
for an implant on a residual group is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _tp
from ._utils import eval_mode, model_signature
from .implant import implant_block_reason, implant_unsupported_reason, implanted_conv, slice_conv
from .planning.types import GroupPlan, PruningPlan
from .units import families, family_for_kind

__all__ = ["prune", "apply_groups", "LAYOUTS"]

LAYOUTS = ("concat", "scatter")


def prune(model: nn.Module, plan: PruningPlan, *, inplace: bool = False, layout: str = "concat") -> nn.Module:
    """The model ``plan`` describes: removed units gone, implanted channels replaced by implants.

    Args:
        model: The model the plan was made on (same architecture and widths; weights may differ, e.g.
            a copy that was trained further).
        plan: From :func:`hap.plan` or :meth:`hap.PruningPlan.load`.
        inplace: Modify ``model`` itself instead of a deep copy.
        layout: ``"concat"`` (kept channels first, consumers permuted once: the fast layout) or
            ``"scatter"`` (implant outputs written into a zero tensor at the original positions; a slow
            reference for benchmarks and tests).

    Returns:
        The pruned model, in the train/eval mode ``model`` was in.

    Raises:
        ValueError: The plan was made for another architecture, names a unit kind no family handles, or
            asks for something this model cannot do (an implant on a residual group); the input model is
            untouched unless ``inplace``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'concat' or 'scatter', got {layout!r}")
    sig = model_signature(model)
    if sig != plan.model_signature:
        raise ValueError(
            f"this plan was made for another model (signature {plan.model_signature}, this model {sig}): "
            "plan again on this model"
        )
    named = dict(model.named_modules())
    for g in plan.groups:
        family_for_kind(g.kind)
        if g.name not in named:
            raise ValueError(f"the plan prunes layer '{g.name}' that the model does not have: plan again on this model")
    out = model if inplace else copy.deepcopy(model)
    p = next(out.parameters(), None)
    apply_groups(out, plan.groups, plan.example_inputs(device=None if p is None else p.device), layout=layout)
    return out


def apply_groups(model: nn.Module, groups: Sequence[GroupPlan], example_inputs: Any, layout: str = "concat") -> None:
    """Prune ``model`` in place as ``groups`` say (the surgery behind :func:`prune`; no signature check)."""
    for g in groups:
        family_for_kind(g.kind)  # unknown kinds fail before anything is cut
    with eval_mode(model):
        for fam in families():
            removed = {g.name: sorted(g.removed) for g in groups if g.kind == fam.kind and g.removed}
            if removed:
                fam.apply(model, removed, example_inputs)
        implanted = [g for g in groups if g.implanted]
        if not implanted:
            return
        named = dict(model.named_modules())
        for g in implanted:
            if g.kind != "channel":
                raise ValueError(
                    f"the plan implants units of '{g.name}', a {g.kind!r} group: only channels take implants"
                )
            reason = implant_unsupported_reason(named[g.name], g.implant or "pointwise")
            if reason is not None:
                raise ValueError(f"the plan implants channels of '{g.name}' but {reason}: plan with implant=None")
        # the graph is traced again on the pruned model: the reorder needs its index maps
        dg = _tp.build_dependency_graph(model, example_inputs)
        orders = {}
        items = {}
        names = {m: k for k, m in named.items()}
        for g in implanted:
            remaining = sorted([*g.kept, *g.implanted])
            pos = {c: i for i, c in enumerate(remaining)}
            orders[g.name] = [pos[c] for c in sorted(g.kept)] + [pos[c] for c in sorted(g.implanted)]
            items[g.name] = _tp.group_items(dg, named[g.name], range(len(remaining)))
            _check_implantable_group(names, items[g.name], named[g.name], g.name)
        if layout == "concat":
            for g in implanted:
                _permute_group(items[g.name], orders[g.name])
        for g in implanted:
            root = named[g.name]
            n_kept = len(g.kept)
            if layout == "concat":
                new = implanted_conv(root, n_kept, g.implant or "pointwise", g.rank)
            else:
                order = orders[g.name]
                new = implanted_conv(slice_conv(root, order), n_kept, g.implant or "pointwise", g.rank,
                                     kept_pos=order[:n_kept], implanted_pos=order[n_kept:])
            new.train(root.training)
            _set_module(model, g.name, new)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _check_implantable_group(names: dict[nn.Module, str], items: list[_tp.Item], root: nn.Module, name: str) -> None:
    """Refuse groups whose channels may not carry an implant (the rule of ``implant_block_reason``)."""
    members = [
        (names[it.module], it.module, "out" if it.is_out else "in")
        for it in items
        if it.module is not root and it.module in names and _has_state(it.module)
    ]
    why = implant_block_reason(name, members)
    if why is not None:
        raise ValueError(f"the plan implants channels of '{name}' but {why}: plan with implant=None")


def _permute_group(items: list[_tp.Item], order: list[int]) -> None:
    """Reorder the channels of a group (its ``items``): new channel ``q`` is old channel ``order[q]``."""
    n = len(order)
    for item in items:
        module = item.module
        if not _has_state(module):
            continue  # a parameter-free op of the traced graph
        blocks: dict[int, list[int]] = {}
        for idx, r in zip(item.idxs, item.roots, strict=True):
            blocks.setdefault(r, []).append(idx)
        if sorted(blocks) != list(range(n)):
            raise ValueError(f"cannot reorder the channels of {type(module).__name__}: its index map is partial")
        if len({len(b) for b in blocks.values()}) != 1:
            raise ValueError(f"cannot reorder channels of {type(module).__name__}: uneven index blocks")
        # block q holds the positions channel q occupies in this tensor (one, or several behind a flatten)
        table = torch.tensor([sorted(blocks[q]) for q in range(n)], dtype=torch.long)
        for pname, dim in _channel_dims(module, item.is_out):
            t = getattr(module, pname)
            perm = torch.arange(t.shape[dim])
            perm[table.reshape(-1)] = table[torch.tensor(order)].reshape(-1)
            with torch.no_grad():
                t.data = t.data.index_select(dim, perm.to(t.device)).contiguous()


def _has_state(module: Any) -> bool:
    """Whether ``module`` holds tensors indexed by channel (parameters or buffers of its own)."""
    if not isinstance(module, nn.Module):
        return False
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _channel_dims(module: nn.Module, is_out: bool) -> list[tuple[str, int]]:
    """(tensor name, dim) pairs that index this module's channels on the side the group touches."""
    if isinstance(module, _BatchNorm):
        names = ("weight", "bias", "running_mean", "running_var")
        return [(n, 0) for n in names if getattr(module, n, None) is not None]
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = bool(module.transposed)
        if is_out:
            dims = [("weight", 1 if transposed else 0)]
            return dims + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 0 if transposed else 1)]
    if isinstance(module, nn.Linear):
        if is_out:
            return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 1)]
    raise ValueError(f"cannot reorder the channels of {type(module).__name__}")
