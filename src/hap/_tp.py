"""The one module that touches Torch-Pruning's internals (pinned: ``torch-pruning==1.6.1``).

hap uses Torch-Pruning as a library for what it does well — tracing dependency groups through residual
adds, concatenations, splits and flattens, and cutting tensors physically — but reads a few of its
internal structures to do so (group items, pruning-function classes, the index maps behind each item,
the op counter's hooks). They are normalised here into :class:`Item` records, so the rest of hap never
sees a Torch-Pruning object, and ``tests/test_adapters.py`` fails loudly if the pinned release changes
them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from ._utils import call_model, eval_mode

__all__ = [
    "tpf",
    "Item",
    "build_dependency_graph",
    "all_groups",
    "group_items",
    "prune_out_channels",
    "count_ops",
    "count_ops_disposable",
]


@dataclass(frozen=True)
class Item:
    """One layer's part in a dependency group.

    Attributes:
        module: The layer (or a parameter-free node created by the tracer).
        handler: Torch-Pruning's pruning function for it (its ``__self__`` tells the layer type).
        is_out: Whether the group cuts the layer's output channels (else its input channels).
        idxs: Indices in this layer's tensor.
        roots: For each of ``idxs``, the root channel it belongs to (several after a flatten).
    """

    module: nn.Module
    handler: Any
    is_out: bool
    idxs: tuple[int, ...]
    roots: tuple[int, ...]


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """Trace ``model`` once on ``example_inputs`` (a tensor, tuple or mapping of keyword tensors)."""
    with eval_mode(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def _items(dg: Any, group: Any) -> list[Item]:
    out = []
    for item in list(group.items) if hasattr(group, "items") else list(group):
        dep, idxs = item[0], item[1]
        roots = getattr(item, "root_idxs", None) or [getattr(h, "root_idx", h) for h in idxs]
        out.append(Item(
            module=dep.target.module,
            handler=dep.handler,
            is_out=bool(dg.is_out_channel_pruning_fn(dep.handler)),
            idxs=tuple(int(getattr(h, "idx", h)) for h in idxs),
            roots=tuple(int(r) for r in roots),
        ))
    return out


def all_groups(dg: Any, ignored: Sequence[nn.Module]) -> list[list[Item]]:
    """Every dependency group rooted at a Conv or Linear layer, ``ignored`` layers' groups left out."""
    groups = dg.get_all_groups(ignored_layers=list(ignored), root_module_types=(nn.modules.conv._ConvNd, nn.Linear))
    return [_items(dg, g) for g in groups]


def group_items(dg: Any, root: nn.Module, idxs: Sequence[int]) -> list[Item]:
    """The group that pruning output channels ``idxs`` of ``root`` would cut."""
    fn = dg.get_pruner_of_module(root).prune_out_channels
    return _items(dg, dg.get_pruning_group(root, fn, list(idxs)))


def prune_out_channels(dg: Any, root: nn.Module, idxs: Sequence[int]) -> None:
    """Cut output channels ``idxs`` of ``root`` and everything coupled to them, in place."""
    fn = dg.get_pruner_of_module(root).prune_out_channels
    dg.get_pruning_group(root, fn, list(idxs)).prune()


def count_ops(model: nn.Module, example_inputs: Any) -> float:
    """Torch-Pruning's MAC count for one forward pass (on its own defensive copy of the model)."""
    with eval_mode(model), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return float(macs)


def count_ops_disposable(model: nn.Module, example_inputs: Any) -> float:
    """:func:`count_ops` without the deep copy, for a model about to be dropped (the planner's candidates).

    Copying each throw-away candidate once more inside the counter doubled planning time. Same hooks,
    same numbers; falls back to the public function if the op counter's layout changes.
    """
    try:
        from torch_pruning.utils.op_counter import add_flops_counting_methods
    except ImportError:  # pragma: no cover - other Torch-Pruning versions
        return count_ops(model, example_inputs)
    model.eval()
    counted = add_flops_counting_methods(model)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        counted.start_flops_count(ost=io.StringIO(), verbose=False, ignore_list=[])
        call_model(counted, example_inputs)
        macs = counted.compute_average_flops_cost()[0]
        counted.stop_flops_count()
    return float(macs)


def is_keyword(example_inputs: Any) -> bool:
    return isinstance(example_inputs, Mapping)
