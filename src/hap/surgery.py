"""Apply a :class:`hap.PruningPlan`: physically smaller tensors, plus Neural Implants where planned.

Three passes over one model:

1. **Remove.** For every group, Torch-Pruning's dependency graph prunes the removed channels out of the
   group's root layer and every layer coupled to it (BatchNorm entries, consumers' input columns,
   across residual adds, concatenations, flattens and depthwise convs):
   ``DG.get_pruning_group(root, prune_out_channels, idxs).prune()``.
2. **Reorder** (groups with implants). On a graph traced again on the smaller model, the group's
   surviving channels are permuted so the kept ones come first and the implanted ones last: the root's
   filters, the BatchNorm entries and running statistics, and every consumer's input columns, with
   Torch-Pruning's own index mapping telling where each channel lands behind a concat or flatten.
   A consistent permutation of a group leaves the network's function unchanged.
3. **Implant.** The root conv becomes ``ImplantedConv(kept filters, implant)`` whose output
   ``cat([kept, implanted])`` is already in the order the consumers now expect.

Implants are only given to groups with a single producer, a k x k convolution, whose channels pass
through nothing but BatchNorms before reaching their consumers (convolutions and linear layers).
Residual groups (several producers tied by an add) are not implanted: an implant in one producer would
still leave the other producers' k x k filters for those channels, so it would save little and the
residual sum would mix an approximation with exact filters; the planner removes such candidates
instead, and this module refuses a plan that asks otherwise.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import eval_mode
from .groups import build_dependency_graph
from .heads import prune_heads
from .implant import implant_unsupported_reason, implanted_conv, slice_conv
from .sensitivity import model_signature

if TYPE_CHECKING:
    from .plan import GroupPlan, PruningPlan

__all__ = ["prune", "apply_groups", "LAYOUTS"]

LAYOUTS = ("concat", "scatter")


def prune(model: nn.Module, plan: PruningPlan, *, inplace: bool = False, layout: str = "concat") -> nn.Module:
    """The model ``plan`` describes: removed channels gone, implanted channels replaced by implants.

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
        ValueError: The plan was made for another architecture, or asks for something this model
            cannot do (an implant on a residual group); the input model is untouched unless ``inplace``.
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
        if g.name not in named:
            raise ValueError(f"the plan prunes layer '{g.name}' that the model does not have: plan again on this model")
    out = model if inplace else copy.deepcopy(model)
    p = next(out.parameters(), None)
    apply_groups(out, plan.groups, plan.example_inputs(device=None if p is None else p.device), layout=layout)
    return out


def apply_groups(model: nn.Module, groups: Sequence[GroupPlan], example_inputs: Any, layout: str = "concat") -> None:
    """Prune ``model`` in place as ``groups`` say (the surgery behind :func:`prune`; no signature check)."""
    heads = {g.name: sorted(g.removed) for g in groups if g.kind == "head" and g.removed}
    groups = [g for g in groups if g.kind == "channel"]
    with eval_mode(model):
        named = dict(model.named_modules())
        dg = None
        if any(g.removed for g in groups):
            dg = build_dependency_graph(model, example_inputs)
            for g in groups:
                if g.removed:
                    root = named[g.name]
                    fn = dg.get_pruner_of_module(root).prune_out_channels
                    dg.get_pruning_group(root, fn, sorted(g.removed)).prune()
        if heads:
            # attention heads: their own slicing (hap.heads); Torch-Pruning does not know heads
            prune_heads(model, heads)
            named = dict(model.named_modules())
            dg = None
        implanted = [g for g in groups if g.implanted]
        if not implanted:
            return
        for g in implanted:
            reason = implant_unsupported_reason(named[g.name], g.implant or "pointwise")
            if reason is not None:
                raise ValueError(f"the plan implants channels of '{g.name}' but {reason}: plan with implant=None")
        if dg is None:  # Torch-Pruning keeps its graph valid through its own pruning: reuse it
            dg = build_dependency_graph(model, example_inputs)
        orders = {}
        items = {}
        names = {m: k for k, m in named.items()}
        for g in implanted:
            remaining = sorted([*g.kept, *g.implanted])
            pos = {c: i for i, c in enumerate(remaining)}
            orders[g.name] = [pos[c] for c in sorted(g.kept)] + [pos[c] for c in sorted(g.implanted)]
            items[g.name] = _group_items(dg, named[g.name], len(remaining))
            _check_implantable_group(dg, names, items[g.name], named[g.name], g.name)
        if layout == "concat":
            for g in implanted:
                _permute_group(dg, items[g.name], orders[g.name])
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


def _group_items(dg: Any, root: nn.Module, n: int) -> list[Any]:
    fn = dg.get_pruner_of_module(root).prune_out_channels
    return list(dg.get_pruning_group(root, fn, list(range(n))).items)


def _check_implantable_group(
    dg: Any, names: dict[nn.Module, str], items: list[Any], root: nn.Module, name: str
) -> None:
    """Refuse groups whose channel order cannot be permuted safely (see the module docstring)."""
    for item in items:
        module = item.dep.target.module
        if module is root or module not in names:
            continue  # the root itself, or a parameter-free op of the traced graph (relu, cat, add, flatten)
        mname = names[module]
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(module, _BatchNorm):
            continue
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) and not is_out:
            if getattr(module, "groups", 1) != 1:
                raise ValueError(
                    f"the plan implants channels of '{name}' but they feed the grouped conv '{mname}': "
                    "plan with implant=None"
                )
            continue
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            raise ValueError(
                f"the plan implants channels of '{name}' but '{mname}' also produces them (a residual add): "
                "only single-producer groups can carry implants; plan with hap.plan again"
            )
        if _has_state(module):
            raise ValueError(
                f"the plan implants channels of '{name}' but they pass through '{mname}' "
                f"({type(module).__name__}), whose channels hap cannot reorder: plan with implant=None"
            )


def _permute_group(dg: Any, items: list[Any], order: list[int]) -> None:
    """Reorder the channels of a group (its ``items``): new channel ``q`` is old channel ``order[q]``."""
    n = len(order)
    for item in items:
        module = item.dep.target.module
        if not _has_state(module):
            continue  # a parameter-free op of the traced graph
        blocks: dict[int, list[int]] = {}
        for idx, r in zip(item.idxs, item.root_idxs, strict=True):
            blocks.setdefault(int(r), []).append(int(idx))
        if sorted(blocks) != list(range(n)):
            raise ValueError(f"cannot reorder the channels of {type(module).__name__}: its index map is partial")
        if len({len(b) for b in blocks.values()}) != 1:
            raise ValueError(f"cannot reorder channels of {type(module).__name__}: uneven index blocks")
        # block q holds the positions channel q occupies in this tensor (one, or several behind a flatten)
        table = torch.tensor([sorted(blocks[q]) for q in range(n)], dtype=torch.long)
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        for pname, dim in _channel_dims(module, is_out):
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
