"""Query slots of grouped-query attention (``units="query_slots"``): one query head of every KV group at once.

The alternative to :mod:`hap.units.heads`' whole-KV-group unit for Llama / Mistral / Qwen2 decoders:
removing slot ``j`` of a layer removes query head ``j`` of each group (its ``q_proj`` rows and ``o_proj``
columns) and keeps K/V, so the layout stays valid GQA with one fewer query head per group.
:mod:`hap.units.decoder` holds the slices and the surgery; docs/llm.md measures the two units against each
other (slots: lower perplexity at equal parameters; groups: the only unit that shrinks the KV cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.nn as nn

from ._layout import AttentionLayout
from ._sliced import SlicedFamily
from .base import Unit, UnsupportedLayerError
from .decoder import prune_decoder_slots, slot_slices
from .heads import attention_layouts, by_name

__all__ = ["QuerySlotFamily", "query_slot_units", "prune_query_slots"]




def _slot_layouts(model: nn.Module) -> list[AttentionLayout]:
    """The model's attention layouts with slots: ``gqa`` ones with KV heads left (a headless layer has none).

    Raises:
        UnsupportedLayerError: An attention block that is not grouped-query attention (named).
        ValueError: No layer has more than one query head per KV head, so no slot could ever be removed.
    """
    layouts = attention_layouts(model)
    other = next((lay for lay in layouts if lay.style != "gqa"), None)
    if other is not None:
        raise UnsupportedLayerError(
            f"attention module '{other.name}' is {other.style!r} attention: query-slot units need Llama/Mistral/"
            "Qwen2-style grouped-query attention (q_proj/k_proj/v_proj/o_proj); use units='heads'"
        )
    layouts = [lay for lay in layouts if lay.num_heads > 0]
    if layouts and all(lay.heads_per_unit == 1 for lay in layouts):
        raise ValueError(
            f"every attention layer of {type(model).__name__} has one query head per KV head, so a layer's only "
            "query slot is all its heads and none can be removed: use units='heads'"
        )
    return layouts


def query_slot_units(model: nn.Module) -> list[Unit]:
    """One :class:`~hap.Unit` (kind ``"query_slot"``) per query slot, layer by layer, slot by slot.

    Slot ``j`` of a layer holds the ``q_proj`` rows (and bias) and ``o_proj`` columns of query head ``j`` in
    every KV group (heads ``g*n_rep + j``); ``group`` is the attention module's qualified name, ``index`` the
    slot (``0..n_rep-1``, renumbered after pruning).

    Raises:
        UnsupportedLayerError: An attention block that is not grouped-query attention (named).
        ValueError: No attention at all, or no layer with more than one query head per KV head.
    """
    params = dict(model.named_parameters())
    return [Unit(lay.name, j, slot_slices(lay, j, params), kind="query_slot")
            for lay in _slot_layouts(model) for j in range(lay.heads_per_unit)]


def prune_query_slots(model: nn.Module, slots_to_remove: Mapping[str, Iterable[int]]) -> nn.Module:
    """Physically remove query slots, in place: in every KV group of each named layer, the query heads of
    those slots lose their ``q_proj`` rows and ``o_proj`` columns, and ``num_key_value_groups`` shrinks by one
    per slot, so the model computes as the original with those heads' ``o_proj`` columns zeroed.

    Args:
        model: The model; modified in place and returned.
        slots_to_remove: ``{attention module name: [slot, ...]}``, slots counted in the model as it is *now*.

    Raises:
        ValueError: An unknown attention module, a slot out of range, or every slot of a layer (one stays).
    """
    layouts = by_name(_slot_layouts(model))
    for name, idx in slots_to_remove.items():
        if name not in layouts:
            known = ", ".join(list(layouts)[:4]) + (", ..." if len(layouts) > 4 else "")
            raise ValueError(f"'{name}' is not a grouped-query attention module with query slots (they are: {known})")
        lay = layouts[name]
        remove = {int(i) for i in idx}
        bad = sorted(j for j in remove if not 0 <= j < lay.heads_per_unit)
        if bad:
            raise ValueError(
                f"attention module '{name}' has {lay.heads_per_unit} query slots; slot {bad[0]} is out of range"
            )
        if remove:
            prune_decoder_slots(model, lay, [j for j in range(lay.heads_per_unit) if j not in remove])
    return model


class QuerySlotFamily(SlicedFamily):
    """Query slots of grouped-query attention (``units="query_slots"``): the alternative to whole KV groups.

    A family of its own, with its own unit kind, rather than an option of ``heads``: the kind is what a plan's
    groups record, so surgery, :func:`hap.load` and repair replay a slot plan as slots without any setting
    travelling beside it.
    """

    name = "query_slots"
    kind = "query_slot"

    def units_of(self, model: nn.Module) -> list[Unit]:
        return query_slot_units(model)

    def remove(self, model: nn.Module, removed: Mapping[str, list[int]]) -> None:
        prune_query_slots(model, removed)
