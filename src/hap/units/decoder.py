"""Attention heads of decoder LLMs: Llama / Mistral / Qwen2 (grouped-query attention) and GPT-2 (fused Conv1D).

Two more layouts for :mod:`hap.units.heads`, found structurally like the encoder ones (no model classes, no
``transformers`` import):

- ``gqa``: a module with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear children and an integer
  ``head_dim`` (transformers v5 Llama, Mistral, Qwen2, Qwen3-style attention; v5's ViT/DeiT attention has
  the same layout without GQA). It may use grouped-query
  attention: ``n_kv`` key/value heads, each shared by ``n_rep = num_key_value_groups`` consecutive query
  heads (``repeat_kv`` repeats K/V head ``g`` for query heads ``g*n_rep .. (g+1)*n_rep-1``).
- ``gpt2``: a module with Conv1D children ``c_attn`` (Q, K and V stacked in its ``3*E`` output columns;
  Conv1D stores its weight transposed, ``(in, out)``) and ``c_proj`` (GPT-2). No GQA.

**A GQA unit is one whole KV group** (``units="heads"``, the default): one key/value head and its ``n_rep``
query heads (its ``n_rep*d`` rows of ``q_proj``, ``d`` rows of ``k_proj`` and ``v_proj``, the same ``n_rep*d``
columns of ``o_proj``). With ``n_rep == 1`` (plain multi-head attention) that is one head. Why whole groups
by default rather than query heads inside a group with the group's K/V kept:

- *Validity for any plan.* HF's ``repeat_kv`` needs every KV head to serve the same number of query heads
  (``num_key_value_groups`` is one integer per layer). Removing whole groups keeps ``n_rep`` and any count
  per layer is valid; removing query heads inside groups is valid only if every group loses the same number,
  so the unit has to be "query slot j of every group" (``n_kv`` heads from different groups at once).
- *What is saved.* A group takes K and V (and their KV-cache memory, the main inference cost GQA exists to
  cut) with it; a query-slot unit removes only Q and O rows/columns, so at equal parameters removed it must
  take ``(2*n_rep + 2)/(2*n_rep)`` times as many heads' outputs, and the KV cache does not shrink at all.

**The alternative, a query slot** (``units="query_slots"``, unit kind ``"query_slot"``): slot ``j`` of a layer
is query head ``j`` of *every* KV group at once (heads ``g*n_rep + j`` for all ``g``): their ``q_proj`` rows (and
bias) and ``o_proj`` columns; K and V stay. Removing ``r`` slots leaves a valid GQA layout with ``n_rep - r``
query heads per KV head, so ``num_key_value_groups`` follows. It is there because the two measurements
disagree: ``benchmarks/llm_study.py`` (``gqa_check``) masks the trained study model by L1 both ways at about
equal parameters removed; on the smoke-size Llama (2 layers, 8 query / 2 KV heads) the whole group lost
slightly less, on the 10M-parameter study Llama query slots lost less (docs/llm.md, "The GQA unit"). Groups
stay the default for the KV cache they free; slots are for a parameter or compute budget. A layer keeps at
least one slot: a slot unit never empties a layer (removing every slot is refused; the planner keeps one unit
per group anyway) — to drop a layer's attention, remove its KV groups.

A decoder layer that loses every unit gets :class:`HeadlessDecoderAttention`: a zero-head attention outputs
nothing, so the block adds ``o_proj``'s bias (zero when it has none). Its projections stay as zero-width
children, so state-dict keys are those of every other layer. (It updates no KV cache: generation with a cache
needs at least one unit in the first layer; the planner keeps one unit per layer in any case.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ._layout import AttentionLayout
from ._sliced import is_conv1d, keep_linear
from .base import ROLE_IN, ROLE_OUT, ParamSlice, UnsupportedLayerError

__all__ = ["HeadlessDecoderAttention", "decoder_geometry", "decoder_slices", "prune_decoder_heads",
           "slot_rows", "slot_slices", "prune_decoder_slots", "GQA_PARTS", "GPT2_PARTS"]

GQA_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
GPT2_PARTS = ("c_attn", "c_proj")


def _child(m: nn.Module, name: str) -> nn.Module | None:
    return m._modules.get(name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def decoder_geometry(name: str, m: nn.Module) -> dict[str, Any] | None:
    """The layout fields of ``m`` if it is ``gqa`` or ``gpt2`` attention (see the module docstring), else None.

    Returns ``AttentionLayout`` keyword arguments: for ``gqa`` ``num_heads`` counts KV groups (the units),
    ``head_size`` is a unit's width in ``q_proj`` rows / ``o_proj`` columns (``n_rep * head_dim``),
    ``kv_size`` its width in ``k_proj``/``v_proj`` rows (``head_dim``), ``heads_per_unit`` is ``n_rep``.

    Raises:
        UnsupportedLayerError: The projections are there but their shapes do not form a valid layout.
    """
    if all(isinstance(_child(m, p), nn.Linear) for p in GQA_PARTS):
        q, k, v, o = (_child(m, p) for p in GQA_PARTS)
        d = getattr(m, "head_dim", None)
        if not isinstance(d, int) or d <= 0:
            raise UnsupportedLayerError(
                f"attention module '{name}' ({type(m).__name__}) has q_proj/k_proj/v_proj/o_proj but no integer "
                "head_dim attribute: hap slices transformers v5 Llama/Mistral/Qwen2-style attention"
            )
        nq, rq = divmod(q.out_features, d)  # type: ignore[union-attr]
        nkv, rkv = divmod(k.out_features, d)  # type: ignore[union-attr]
        groups = getattr(m, "num_key_value_groups", None)
        n_rep = nq // nkv if nkv else groups
        if (rq or rkv or v.out_features != k.out_features or o.in_features != q.out_features  # type: ignore[union-attr]
                or not isinstance(n_rep, int) or n_rep <= 0 or (nkv and nq != nkv * n_rep)
                or (isinstance(groups, int) and groups != n_rep)):
            raise UnsupportedLayerError(
                f"attention module '{name}': q_proj {tuple(q.weight.shape)}, k_proj {tuple(k.weight.shape)}, "  # type: ignore[union-attr]
                f"v_proj {tuple(v.weight.shape)}, o_proj {tuple(o.weight.shape)} with head_dim {d} and "  # type: ignore[union-attr]
                f"num_key_value_groups {groups} are not a valid grouped-query layout"
            )
        return {"name": name, "core": name, "query": _join(name, "q_proj"), "key": _join(name, "k_proj"),
                "value": _join(name, "v_proj"), "output": _join(name, "o_proj"), "num_heads": nkv,
                "head_size": n_rep * d, "style": "gqa", "kv_size": d, "heads_per_unit": n_rep}
    if all(is_conv1d(_child(m, p)) for p in GPT2_PARTS) and "c_fc" not in m._modules:
        if "q_attn" in m._modules:
            raise UnsupportedLayerError(
                f"attention module '{name}' is GPT-2 cross-attention (q_attn): hap slices self-attention only"
            )
        c_attn, c_proj = _child(m, "c_attn"), _child(m, "c_proj")
        d = getattr(m, "head_dim", None)
        width = c_proj.weight.shape[0]  # type: ignore[union-attr]
        if (not isinstance(d, int) or d <= 0 or width % d or c_attn.weight.shape[1] != 3 * width  # type: ignore[union-attr]
                or getattr(m, "split_size", width) != width):
            raise UnsupportedLayerError(
                f"attention module '{name}': c_attn {tuple(c_attn.weight.shape)} and c_proj "  # type: ignore[union-attr]
                f"{tuple(c_proj.weight.shape)} with head_dim {d} are not a GPT-2 layout (c_attn = Q|K|V)"  # type: ignore[union-attr]
            )
        return {"name": name, "core": name, "query": _join(name, "c_attn"), "key": _join(name, "c_attn"),
                "value": _join(name, "c_attn"), "output": _join(name, "c_proj"), "num_heads": width // d,
                "head_size": d, "style": "gpt2", "kv_size": d, "heads_per_unit": 1}
    return None


def _rows(units: Sequence[int], size: int) -> list[int]:
    return [i for u in units for i in range(u * size, (u + 1) * size)]


def _fused_cols(lay: AttentionLayout, units: Sequence[int]) -> list[int]:
    """Columns of GPT-2's ``c_attn`` (Q | K | V, each ``num_heads*head_size`` wide) owned by ``units``."""
    width = lay.num_heads * lay.head_size
    base = _rows(units, lay.head_size)
    return base + [width + i for i in base] + [2 * width + i for i in base]


def decoder_slices(lay: AttentionLayout, unit: int, params: Mapping[str, Any]) -> tuple[ParamSlice, ...]:
    """The parameter slices of unit ``unit`` (a KV group, or a GPT-2 head) of a ``gqa``/``gpt2`` layout."""
    q_idx = tuple(_rows([unit], lay.head_size))
    out: list[ParamSlice] = []
    if lay.style == "gpt2":
        cols = tuple(_fused_cols(lay, [unit]))
        out.append(ParamSlice(f"{lay.query}.weight", 1, cols, ROLE_OUT))
        if f"{lay.query}.bias" in params:
            out.append(ParamSlice(f"{lay.query}.bias", 0, cols, ROLE_OUT))
        out.append(ParamSlice(f"{lay.output}.weight", 0, q_idx, ROLE_IN))
        return tuple(out)
    kv_idx = tuple(_rows([unit], lay.kv_size))
    for proj, idx in ((lay.query, q_idx), (lay.key, kv_idx), (lay.value, kv_idx)):
        out.append(ParamSlice(f"{proj}.weight", 0, idx, ROLE_OUT))
        if f"{proj}.bias" in params:
            out.append(ParamSlice(f"{proj}.bias", 0, idx, ROLE_OUT))
    out.append(ParamSlice(f"{lay.output}.weight", 1, q_idx, ROLE_IN))
    return tuple(out)


class HeadlessDecoderAttention(nn.Module):
    """Stands in for a decoder attention module (``gqa`` or ``gpt2``) whose units were all removed.

    Keeps the zero-width projections as children under their names and the geometry attributes
    (``head_dim``, ``num_key_value_groups``, ``layer_idx``), so the layout is still recognised and state-dict
    keys do not change. ``forward`` returns the output projection applied to an empty head output (= its
    bias, or zeros) and no attention weights, as the decoder layers expect (``out, _ = self_attn(...)``).
    """

    def __init__(self, original: nn.Module, parts: Sequence[str], heads_per_unit: int = 1) -> None:
        super().__init__()
        for p in parts:
            self.add_module(p, original._modules[p])
        self.output_name = parts[-1]
        self.head_dim = int(original.head_dim)
        self.num_key_value_groups = int(heads_per_unit)  # the geometry is still read from a headless layer
        for attr in ("layer_idx", "config"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))
        if "c_attn" in parts:
            self.split_size = 0
            self.num_heads = 0
        self.train(original.training)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        # computed, not called: GPT-2's Conv1D cannot reshape an empty input (``view(-1, 0)``)
        proj = getattr(self, self.output_name)
        width = proj.nf if is_conv1d(proj) else proj.out_features
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], width))
        if proj.bias is not None:
            out = out + proj.bias.to(out.dtype)
        return out, None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prune_decoder_heads(model: nn.Module, lay: AttentionLayout, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (sorted) of the ``gqa``/``gpt2`` layout ``lay``, in place.

    ``gqa``: the kept groups' rows of Q, K, V and columns of O stay; ``num_key_value_groups`` is unchanged
    (whole groups go), so every layer stays a valid GQA layout whatever the count. ``gpt2``: the kept heads'
    Q, K and V columns of ``c_attn`` and rows of ``c_proj``; ``split_size`` and ``num_heads`` follow.
    """
    named = dict(model.named_modules())
    core = named[lay.core]
    q_rows = torch.tensor(_rows(keep, lay.head_size), dtype=torch.long)
    if lay.style == "gpt2":
        keep_linear(named[lay.query], torch.tensor(_fused_cols(lay, keep), dtype=torch.long), 1, True)
        keep_linear(named[lay.output], q_rows, 0, False)
        parts: Sequence[str] = GPT2_PARTS
        if keep:
            core.split_size = len(keep) * lay.head_size
            if isinstance(getattr(core, "num_heads", None), int):
                core.num_heads = len(keep)
    else:
        kv_rows = torch.tensor(_rows(keep, lay.kv_size), dtype=torch.long)
        keep_linear(named[lay.query], q_rows, 0, True)
        keep_linear(named[lay.key], kv_rows, 0, True)
        keep_linear(named[lay.value], kv_rows, 0, True)
        keep_linear(named[lay.output], q_rows, 1, False)
        parts = GQA_PARTS
        n_q = len(keep) * lay.heads_per_unit
        for attr, n in (("num_heads", n_q), ("num_attention_heads", n_q), ("num_key_value_heads", len(keep))):
            if isinstance(getattr(core, attr, None), int):
                setattr(core, attr, n)
    if not keep and not isinstance(core, HeadlessDecoderAttention):
        _set_module(model, lay.core, HeadlessDecoderAttention(core, parts, lay.heads_per_unit))


# --------------------------------------------------------------------------------------------------
# query slots (see the module docstring): query head j of every KV group, K/V kept


def slot_rows(lay: AttentionLayout, slots: Sequence[int]) -> list[int]:
    """``q_proj`` rows (= ``o_proj`` columns) of query slots ``slots`` (sorted) in every KV group of the ``gqa``
    layout ``lay``, in ascending order: group-major, the order ``repeat_kv`` expects the query heads in."""
    d, n_rep = lay.kv_size, lay.heads_per_unit
    return [i for g in range(lay.num_heads) for j in slots for i in range((g * n_rep + j) * d, (g * n_rep + j + 1) * d)]


def slot_slices(lay: AttentionLayout, slot: int, params: Mapping[str, Any]) -> tuple[ParamSlice, ...]:
    """The parameter slices of query slot ``slot`` of a ``gqa`` layout: ``q_proj`` rows (and bias), ``o_proj``
    columns of query head ``slot`` in every KV group; nothing of ``k_proj``/``v_proj``."""
    idx = tuple(slot_rows(lay, [slot]))
    out = [ParamSlice(f"{lay.query}.weight", 0, idx, ROLE_OUT)]
    if f"{lay.query}.bias" in params:
        out.append(ParamSlice(f"{lay.query}.bias", 0, idx, ROLE_OUT))
    out.append(ParamSlice(f"{lay.output}.weight", 1, idx, ROLE_IN))
    return tuple(out)


def prune_decoder_slots(model: nn.Module, lay: AttentionLayout, keep: Sequence[int]) -> None:
    """Keep only query slots ``keep`` (sorted, not empty) of the ``gqa`` layout ``lay``, in place.

    Every KV group keeps the same query heads, so the layer stays a valid GQA layout: ``num_key_value_groups``
    becomes ``len(keep)`` and any integer query-head count (``num_heads``/``num_attention_heads``, where the
    module has one) ``n_kv * len(keep)``; K and V are untouched.

    Raises:
        ValueError: ``keep`` is empty (a layer keeps at least one slot), or ``lay`` is not a ``gqa`` layout.
    """
    if lay.style != "gqa":
        raise ValueError(f"'{lay.name}' is {lay.style!r} attention: only grouped-query (gqa) layouts have query slots")
    if not keep:
        raise ValueError(
            f"cannot remove all {lay.heads_per_unit} query slots of '{lay.name}': a layer keeps at least one "
            "(to drop its attention, remove its KV groups with units='heads')"
        )
    named = dict(model.named_modules())
    core = named[lay.core]
    rows = torch.tensor(slot_rows(lay, keep), dtype=torch.long)
    keep_linear(named[lay.query], rows, 0, True)
    keep_linear(named[lay.output], rows, 1, False)
    core.num_key_value_groups = len(keep)
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(core, attr, None), int):
            setattr(core, attr, lay.num_heads * len(keep))
