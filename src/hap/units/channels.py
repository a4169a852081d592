"""Structured units: what disappears together when one channel (or head) is pruned.

A *unit* is a list of parameter slices ``(parameter name, dim, indices)``. The sensitivity engine only
ever sees units, so it works the same for CNN channels and attention heads. Channel units come from
Torch-Pruning's dependency graph: it already knows how residual adds, concatenations, splits,
flattening and depthwise convolutions couple channels across layers, and keeping a hand-written map
per architecture is exactly the kind of code that silently mis-indexes. What Torch-Pruning does not
give us is the *parameter slices* behind each pruning function; we translate them here, per layer
type, and refuse any layer type we have not checked.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import _tp
from .._tp import tpf
from .base import ROLE_IN, ROLE_OUT, ParamSlice, Unit, UnsupportedLayerError

__all__ = [
    "ParamSlice",
    "Unit",
    "ChannelGroup",
    "channel_groups",
    "flatten_units",
    "UnsupportedLayerError",
    "ChannelFamily",
    "remove_channels",
]

@dataclass
class ChannelGroup:
    """Channels coupled by the dependency graph; pruning channel ``i`` removes ``units[i]`` entirely.

    Attributes:
        name: Qualified name of the root layer (the first producer Torch-Pruning found).
        producers: Layers whose *output* channels belong to the group (more than one across a residual add).
        consumers: Layers whose *input* channels are sliced with the group.
        units: One unit per channel, in channel order.
    """

    name: str
    producers: list[str]
    consumers: list[str]
    units: list[Unit] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)


def flatten_units(groups: Iterable[ChannelGroup]) -> list[Unit]:
    """All units of all groups, in group order."""
    return [u for g in groups for u in g.units]


def _conv_slices(
    module: nn.Module, name: str, is_out: bool, idx: int, is_depthwise: bool
) -> list[tuple[str, int, int, str]]:
    assert isinstance(module, nn.modules.conv._ConvNd)
    if is_depthwise or (module.groups == module.in_channels == module.out_channels and module.groups > 1):
        # Depthwise: input channel i and output channel i are the same filter; both pruning
        # functions cut weight row i (Torch-Pruning couples them), so the slice is identical.
        out = [(f"{name}.weight", 0, idx, ROLE_OUT)]
        if module.bias is not None:
            out.append((f"{name}.bias", 0, idx, ROLE_OUT))
        return out
    if module.groups != 1:
        raise UnsupportedLayerError(
            f"layer '{name}' is a grouped convolution (groups={module.groups}); only groups=1 and "
            "depthwise convolutions are supported: exclude it with exclude=['{name}']"
        )
    transposed = bool(getattr(module, "transposed", False))
    if is_out:
        out = [(f"{name}.weight", 1 if transposed else 0, idx, ROLE_OUT)]
        if module.bias is not None:
            out.append((f"{name}.bias", 0, idx, ROLE_OUT))
        return out
    return [(f"{name}.weight", 0 if transposed else 1, idx, ROLE_IN)]


def _linear_slices(module: nn.Linear, name: str, is_out: bool, idx: int) -> list[tuple[str, int, int, str]]:
    if is_out:
        out = [(f"{name}.weight", 0, idx, ROLE_OUT)]
        if module.bias is not None:
            out.append((f"{name}.bias", 0, idx, ROLE_OUT))
        return out
    return [(f"{name}.weight", 1, idx, ROLE_IN)]


def _norm_slices(module: nn.Module, name: str, idx: int, role: str) -> list[tuple[str, int, int, str]]:
    # Running statistics are buffers, not parameters: they do not enter the Hessian.
    out = []
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if isinstance(p, torch.Tensor) and p.requires_grad:
            if p.dim() != 1:
                raise UnsupportedLayerError(
                    f"layer '{name}' has a {p.dim()}-d {pname}; only per-channel (1-d) affine parameters "
                    f"are supported: exclude it with exclude=['{name}']"
                )
            out.append((f"{name}.{pname}", 0, idx, role))
    return out


def _slices_for(
    module: nn.Module, name: str, handler: Any, idx: int, is_out: bool
) -> list[tuple[str, int, int, str]]:
    """Parameter slices that ``handler`` (a Torch-Pruning pruning function) removes for index ``idx``."""
    pruner = getattr(handler, "__self__", None)
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return []  # a parameter-free node (add, concat, reshape, activation): nothing to slice
    role = ROLE_OUT if is_out else ROLE_IN
    if isinstance(pruner, tpf.DepthwiseConvPruner):
        return _conv_slices(module, name, is_out, idx, True)
    if isinstance(pruner, tpf.ConvPruner) and isinstance(module, nn.modules.conv._ConvNd):
        return _conv_slices(module, name, is_out, idx, False)
    if isinstance(pruner, tpf.LinearPruner) and isinstance(module, nn.Linear):
        return _linear_slices(module, name, is_out, idx)
    if isinstance(pruner, tpf.BatchnormPruner | tpf.GroupNormPruner | tpf.InstanceNormPruner):
        return _norm_slices(module, name, idx, ROLE_OUT)
    if isinstance(pruner, tpf.LayernormPruner):
        shape = tuple(getattr(module, "normalized_shape", ()))
        if len(shape) != 1:
            raise UnsupportedLayerError(
                f"layer '{name}' is a LayerNorm over {len(shape)} dims; only 1-d normalized_shape is "
                f"supported: exclude it with exclude=['{name}']"
            )
        return _norm_slices(module, name, idx, ROLE_OUT)
    if isinstance(module, nn.RNNBase):
        raise _Recurrent(f"layer '{name}' ({type(module).__name__}) is recurrent")
    if isinstance(pruner, tpf.PReLUPruner):
        w = module.weight
        return [] if w.numel() == 1 else [(f"{name}.weight", 0, idx, role)]
    raise UnsupportedLayerError(
        f"layer '{name}' ({type(module).__name__}) sits in a channel group but hap does not know how "
        f"its parameters are sliced: exclude it with exclude=['{name}'] or wrap it in supported layers"
    )


class _Recurrent(UnsupportedLayerError):
    """A recurrent layer in a channel group (re-raised naming the group's layers)."""


def _gn_block(items: Sequence[_tp.Item], name_of: Mapping[nn.Module, str]) -> int:
    """Channels per unit of a group: 1, or the lcm of the channels per GroupNorm group of its GroupNorms.

    GroupNorm normalises each group of ``C / num_groups`` channels with the group's own statistics; removing
    some channels of a group would change what the rest are normalised with. Removing whole GroupNorm
    groups (and lowering ``num_groups``) leaves every other group's output exactly as it was.
    """
    block = 1
    for it in items:
        m = it.module
        if isinstance(m, nn.GroupNorm):
            if tuple(it.idxs) != tuple(it.roots):
                raise UnsupportedLayerError(
                    f"GroupNorm '{name_of.get(m, m)}' sees its channels re-indexed (behind a concat or split): "
                    f"hap cannot keep its groups whole there: exclude=['{name_of.get(m, m)}']")
            block = math.lcm(block, m.num_channels // m.num_groups)
    return block


def _feeding(model: nn.Module, example_inputs: Any, recurrent: Sequence[str]) -> list[str]:
    """Conv/Linear layers whose output tensor is the input of a recurrent layer (one traced forward)."""
    from .._utils import call_model, eval_mode

    # the tensors themselves are kept (not their ids): a freed tensor's id is reused by a later one
    made: list[tuple[torch.Tensor, str]] = []
    fed: list[torch.Tensor] = []
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            hooks.append(m.register_forward_hook(lambda _m, _i, o, n=n: made.append((o, n))))
        elif n in recurrent:
            hooks.append(m.register_forward_hook(lambda _m, i, _o: fed.append(i[0])))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return sorted({n for o, n in made if any(o is f for f in fed)})


def _recurrent_error(model: nn.Module, name: str, keep: Sequence[str]) -> UnsupportedLayerError:
    how = f"keep the channels feeding it whole with exclude={list(keep)}" if keep else \
        "exclude the layers whose outputs feed it"
    return UnsupportedLayerError(
        f"layer '{name}' ({type(model.get_submodule(name)).__name__}) is recurrent: hap cannot slice recurrent "
        f"weights; {how} (excluding the recurrent layer itself does not help: its input still depends on them)")


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same tensor, for tensors two modules share."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return {n: names for names in by_id.values() if len(names) > 1 for n in names}


def _resolve_exclude(model: nn.Module, exclude: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    named = dict(model.named_modules())
    out: list[nn.Module] = []
    for e in exclude or ():
        if isinstance(e, nn.Module):
            out.append(e)
        elif e in named:
            out.append(named[e])
        else:
            raise ValueError(f"exclude names a layer '{e}' that the model does not have")
    return out


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    exclude: Sequence[str | nn.Module] | None = None,
    include_output: bool = False,
) -> list[ChannelGroup]:
    """Channel units of every prunable dependency group of ``model``.

    Args:
        model: Any ``nn.Module`` Torch-Pruning can trace.
        example_inputs: One batch of inputs, used only to trace the graph.
        exclude: Layers (names or modules) that must keep all their channels; a group containing any
            of them is left out, because pruning the group would cut the excluded layer too.
        include_output: Keep groups whose channels reach the model output unconsumed (the classifier's
            classes). They are dropped by default: removing a class is not compression.

    Raises:
        UnsupportedLayerError: A group contains a layer whose slicing is not handled; the message
            names the layer and how to exclude it.
        ValueError: No prunable group was found, or ``exclude`` names a layer the model lacks.
    """
    name_of = {m: n for n, m in model.named_modules()}
    ignored = _resolve_exclude(model, exclude)
    recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    # Torch-Pruning either fails on a recurrent layer or (nn.RNN) skips it and couples its input with its
    # output consumers: the layers feeding one are found by a forward pass instead, and must stay whole
    feeding = _feeding(model, example_inputs, recurrent) if recurrent else []
    try:
        dg = _tp.build_dependency_graph(model, example_inputs)
        all_items = _tp.all_groups(dg, ignored)
    except (IndexError, KeyError, AttributeError) as e:  # Torch-Pruning's tracer on layers it cannot follow
        if recurrent:
            raise _recurrent_error(model, recurrent[0], feeding) from e
        raise
    tied = _tied_names(model)
    tied_roots: list[str] = []
    groups: list[ChannelGroup] = []
    for items in all_items:
        root_name = name_of.get(items[0].module, str(items[0].module))
        per_unit: dict[int, dict[tuple[str, int, str], set[int]]] = {}
        producers: list[str] = []
        consumers: list[str] = []
        block = _gn_block(items, name_of)
        try:
            for item in items:
                module = item.module
                if module not in name_of:
                    continue  # parameter-free functional node created by the tracer
                mname = name_of[module]
                has_params = any(p.requires_grad for p in module.parameters(recurse=False))
                if has_params and isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                    (producers if item.is_out else consumers).append(mname)
                # item.roots: the root channel each local index belongs to; after a flatten one channel owns
                # several input features of the next Linear; a GroupNorm group makes ``block`` channels one unit
                for local, root in zip(item.idxs, item.roots, strict=True):
                    for pname, dim, i, role in _slices_for(module, mname, item.handler, local, item.is_out):
                        per_unit.setdefault(root // block, {}).setdefault((pname, dim, role), set()).add(i)
        except _Recurrent:
            raise _recurrent_error(model, recurrent[0], feeding or sorted(set(producers))) from None
        if set(producers) & set(feeding):
            raise _recurrent_error(model, recurrent[0], feeding)
        if not consumers and not include_output:
            continue  # nothing reads these channels: they are the model's outputs
        if len(per_unit) < 2 and block > 1:
            continue  # one GroupNorm group (num_groups=1) over all channels: only prunable as a whole
        if any(p in tied for slices in per_unit.values() for (p, _, _) in slices):
            tied_roots.append(root_name)
            continue
        units = []
        for root in sorted(per_unit):
            slices = tuple(
                ParamSlice(p, d, tuple(sorted(ix)), role) for (p, d, role), ix in sorted(per_unit[root].items())
            )
            units.append(Unit(root_name, root, slices))
        if units:
            groups.append(ChannelGroup(root_name, sorted(set(producers)), sorted(set(consumers)), units))
    if tied_roots:
        shared = sorted({", ".join(v) for v in tied.values()})
        raise UnsupportedLayerError(
            f"the model has tied parameters (one tensor used by several layers: {'; '.join(shared)}), and the "
            f"channel groups of {tied_roots} slice them: pruning one user would silently cut the other; keep "
            f"them whole with exclude={tied_roots}")
    if not groups:
        raise ValueError(
            "the model has no prunable channel groups (no Conv/Linear layer whose outputs feed another "
            "layer, or all of them excluded)"
        )
    return groups


def remove_channels(model: nn.Module, removed: Mapping[str, Sequence[int]], example_inputs: Any) -> Any:
    """Remove units ``{group root layer: [unit, ...]}`` from ``model`` in place, with every layer coupled to
    them (BatchNorm entries, consumers' input columns, across adds, concats and flattens). A unit is one
    channel, or one whole GroupNorm group of channels where the group passes through a GroupNorm.

    Returns:
        The dependency graph, still valid for the pruned model (Torch-Pruning keeps it up to date), or
        ``None`` when nothing was removed.
    """
    todo = {g: sorted(int(i) for i in ix) for g, ix in removed.items() if ix}
    if not todo:
        return None
    named = dict(model.named_modules())
    for g in todo:
        if g not in named:
            raise ValueError(f"the plan prunes layer '{g}' that the model does not have: plan again on this model")
    dg = _tp.build_dependency_graph(model, example_inputs)
    name_of = {m: n for n, m in named.items()}
    for g, idx in todo.items():
        items = _tp.group_items(dg, named[g], [0])
        block = _gn_block(items, name_of)
        norms = {it.module: it.module.num_channels // it.module.num_groups
                 for it in items if isinstance(it.module, nn.GroupNorm)}
        # a unit of a GroupNorm'd group is a whole GroupNorm group: ``block`` channels
        channels = sorted(u * block + j for u in idx for j in range(block))
        _tp.prune_out_channels(dg, named[g], channels)
        for m, per_group in norms.items():  # Torch-Pruning leaves num_groups alone: fewer, equal groups
            m.num_groups = m.num_channels // per_group
    return dg


class ChannelFamily:
    """Conv/Linear output channels with everything coupled to them (Torch-Pruning's dependency groups)."""

    name = "channels"
    kind = "channel"

    def discover(self, model: nn.Module, example_inputs: Any, exclude: Sequence[str] = ()) -> list[Unit]:
        return flatten_units(channel_groups(model, example_inputs, exclude=list(exclude)))

    def apply(self, model: nn.Module, removed: Mapping[str, Sequence[int]], example_inputs: Any) -> None:
        remove_channels(model, removed, example_inputs)

    def estimation_context(self, model: nn.Module) -> AbstractContextManager[Any]:
        return contextlib.nullcontext(model)
