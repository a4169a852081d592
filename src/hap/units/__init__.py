"""Unit families: what can be pruned, found in a model and removed physically.

``channels`` (Torch-Pruning dependency groups of Conv/Linear layers), ``heads`` (attention heads of
Hugging Face-style encoders, decoder LLMs with grouped-query attention, GPT-2 and ViT; whole KV groups under
GQA), ``query_slots`` (under GQA, query head j of every KV group, K/V kept) and ``neurons`` (their
feed-forward neurons) are registered here; a new
family implements :class:`UnitFamily` and calls :func:`register_family` — nothing else in hap changes
(the planner and surgery dispatch on the kind).
"""

from .base import (
    FAMILIES,
    ROLE_IN,
    ROLE_OUT,
    ParamSlice,
    Unit,
    UnitFamily,
    UnsupportedLayerError,
    families,
    family_for_kind,
    get_family,
    register_family,
    unregister_family,
)
from .channels import ChannelFamily, ChannelGroup, channel_groups, flatten_units, remove_channels
from .heads import HeadFamily, attention_layouts, head_units, mask_heads, prune_heads
from .neurons import NeuronFamily, mask_neurons, mlp_layouts, neuron_units, prune_neurons
from .query_slots import QuerySlotFamily, prune_query_slots, query_slot_units

register_family(ChannelFamily())
register_family(HeadFamily())
register_family(QuerySlotFamily())
register_family(NeuronFamily())

__all__ = [
    "FAMILIES",
    "ROLE_IN",
    "ROLE_OUT",
    "ParamSlice",
    "Unit",
    "UnitFamily",
    "UnsupportedLayerError",
    "families",
    "family_for_kind",
    "get_family",
    "register_family",
    "unregister_family",
    "ChannelFamily",
    "ChannelGroup",
    "channel_groups",
    "flatten_units",
    "remove_channels",
    "HeadFamily",
    "attention_layouts",
    "head_units",
    "mask_heads",
    "prune_heads",
    "QuerySlotFamily",
    "query_slot_units",
    "prune_query_slots",
    "NeuronFamily",
    "mlp_layouts",
    "mask_neurons",
    "neuron_units",
    "prune_neurons",
]
