"""Attention heads as prunable units: discovery, gates, the Michel et al. score and head surgery.

transformers v5 removed ``prune_heads`` and ``head_mask``, so everything a head needs is here, found
*structurally* rather than by model class: an attention block is recognised by its projections, and
every v5 encoder that follows one of these layouts is supported (BERT, RoBERTa, XLM-R, ELECTRA,
MiniLM, ... share the first; DistilBERT is the second; ALBERT the third):

- ``split``: a module with ``query``/``key``/``value`` Linear children (the *core*, which splits heads
  in ``forward``) whose parent also has ``output.dense`` (the output projection). The group is the
  parent, e.g. ``bert.encoder.layer.0.attention``.
- ``fused``: one module with ``q_lin``/``k_lin``/``v_lin``/``out_lin`` (DistilBERT).
- ``albert``: one module with ``query``/``key``/``value``/``dense`` whose ``forward`` also applies the
  residual LayerNorm (ALBERT).
- ``gqa`` (Llama, Mistral, Qwen2: ``q_proj``/``k_proj``/``v_proj``/``o_proj``, grouped-query attention;
  a unit is one KV group) and ``gpt2`` (fused ``c_attn`` Conv1D + ``c_proj``): decoder layouts, in
  :mod:`hap.units.decoder`, which says why a GQA unit is a whole KV group. The other GQA unit, a *query
  slot* (query head ``j`` of every KV group, K/V kept), is the ``query_slots`` family
  (:class:`QuerySlotFamily`, unit kind ``"query_slot"``).

A head ``h`` owns rows ``[h*d, (h+1)*d)`` of Q, K and V (weights and biases) and the same columns of
the output projection; the output projection's bias belongs to no head. The v5 cores reshape with
``view(..., -1, head_size)``, so the head *count* is implied by the weight shapes: slicing the weights
and keeping the bookkeeping attributes in step is all a partial pruning needs. A layer that loses
every head cannot go through that reshape (``-1`` is ambiguous for an empty tensor), so its core is
replaced by :class:`HeadlessAttention`, which returns what a zero-head attention computes: nothing,
so the block adds only the output projection's bias.

Michel et al.'s score lives in :mod:`hap.criteria.michel`, the eager-attention switch in :mod:`hap._hf`.
Nothing here imports ``transformers``: the layouts are checked on ``nn.Linear`` shapes and attribute
names, so the library works (and these functions raise clear errors) without it installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ._layout import AttentionLayout
from ._sliced import SlicedFamily, keep_linear
from .base import ROLE_IN, ROLE_OUT, ParamSlice, Unit, UnsupportedLayerError
from .decoder import decoder_geometry, decoder_slices, prune_decoder_heads

__all__ = [
    "AttentionLayout",
    "HeadlessAttention",
    "attention_layouts",
    "head_units",
    "head_gates",
    "mask_heads",
    "prune_heads",
    "HeadFamily",
    "by_name",
]

# Attribute names a core may use for its head count / head size, in the order they are trusted.
_COUNT_ATTRS = ("num_attention_heads", "n_heads", "num_heads")
_SIZE_ATTRS = ("attention_head_size", "head_dim", "dim_per_head")
# Child-name sets that look like attention projections we do not (yet) know how to slice.
_FOREIGN_PROJ = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("qkv",), ("query_key_value",), ("Wqkv",))


def _linear(module: nn.Module, child: str) -> nn.Linear | None:
    m = getattr(module, child, None) if child in module._modules else None
    return m if isinstance(m, nn.Linear) else None


def _has_linears(module: nn.Module, names: Sequence[str]) -> bool:
    return all(_linear(module, n) is not None for n in names)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _head_geometry(core: nn.Module, name: str, q: nn.Linear) -> tuple[int, int]:
    """(num_heads, head_size) read from the core's attributes, else from its config."""
    count = next((getattr(core, a) for a in _COUNT_ATTRS if isinstance(getattr(core, a, None), int)), None)
    size = next((getattr(core, a) for a in _SIZE_ATTRS if isinstance(getattr(core, a, None), int)), None)
    cfg = getattr(core, "config", None)
    if count is None and cfg is not None:
        count = next((getattr(cfg, a) for a in _COUNT_ATTRS if isinstance(getattr(cfg, a, None), int)), None)
    if count is None:
        raise UnsupportedLayerError(
            f"attention module '{name}' ({type(core).__name__}) has no head count: expected one of the "
            f"attributes {', '.join(_COUNT_ATTRS)} on the module or its config"
        )
    if size is None:
        if count <= 0 or q.out_features % count:
            raise UnsupportedLayerError(
                f"attention module '{name}': query has {q.out_features} outputs, not a multiple of {count} heads"
            )
        size = q.out_features // count
    return int(count), int(size)


def _check_shapes(layout: AttentionLayout, lin: Mapping[str, nn.Linear]) -> None:
    width = layout.num_heads * layout.head_size
    for role in ("query", "key", "value"):
        if lin[role].out_features != width:
            raise UnsupportedLayerError(
                f"attention module '{layout.name}': {role} has {lin[role].out_features} outputs but "
                f"{layout.num_heads} heads x {layout.head_size} = {width}; grouped/multi-query attention "
                "(fewer key/value heads) is supported in the q_proj/k_proj/v_proj/o_proj (Llama) layout only"
            )
    if lin["output"].in_features != width:
        raise UnsupportedLayerError(
            f"attention module '{layout.name}': the output projection reads {lin['output'].in_features} "
            f"features but the heads produce {width}"
        )


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """Every supported attention block of ``model``, in module order; blocks with no heads left
    (pruned to nothing) are included with ``num_heads == 0``.

    Raises:
        UnsupportedLayerError: A module looks like attention (query/key/value-style projections, or
            ``nn.MultiheadAttention``) but its layout is not one hap can slice; the message names it.
        ValueError: The model has no attention module at all.
    """
    named = dict(model.named_modules())
    layouts: list[AttentionLayout] = []
    for name, m in named.items():
        if isinstance(m, nn.MultiheadAttention):
            raise UnsupportedLayerError(
                f"module '{name}' is a torch.nn.MultiheadAttention (fused in_proj_weight); hap slices "
                "heads of Hugging Face-style attention with separate query/key/value Linear layers only"
            )
        geometry = decoder_geometry(name, m)
        if geometry is not None:
            layouts.append(AttentionLayout(**geometry))
            continue
        if _has_linears(m, ("q_lin", "k_lin", "v_lin", "out_lin")):
            style, core_name, parts = "fused", name, ("q_lin", "k_lin", "v_lin", "out_lin")
            group, out_name = name, _join(name, "out_lin")
        elif _has_linears(m, ("query", "key", "value")):
            parts = ("query", "key", "value")
            core_name = name
            if _linear(m, "dense") is not None:
                style, group, out_name = "albert", name, _join(name, "dense")
            else:
                parent_name = name.rpartition(".")[0] if "." in name else ""
                parent = named.get(parent_name) if name else None
                out_mod = getattr(parent, "output", None) if parent is not None else None
                if (
                    parent is None
                    or "output" not in parent._modules
                    or out_mod is m
                    or not isinstance(out_mod, nn.Module)
                    or _linear(out_mod, "dense") is None
                ):
                    raise UnsupportedLayerError(
                        f"attention module '{name}' ({type(m).__name__}) has query/key/value projections "
                        "but no output projection hap recognises (a sibling 'output.dense' Linear, as in "
                        "BERT, or its own 'dense' Linear, as in ALBERT)"
                    )
                style, group, out_name = "split", parent_name, _join(parent_name, "output.dense")
        else:
            for names in _FOREIGN_PROJ:
                if _has_linears(m, names):
                    raise UnsupportedLayerError(
                        f"module '{name}' ({type(m).__name__}) looks like attention ({'/'.join(names)} "
                        "projections) but its layout is not supported; hap slices BERT/RoBERTa-style "
                        "(query/key/value + output.dense), DistilBERT-style (q_lin/k_lin/v_lin/out_lin), "
                        "Llama-style (q_proj/k_proj/v_proj/o_proj + head_dim) and GPT-2 (c_attn/c_proj) attention"
                    )
            continue
        q_name, k_name, v_name = (_join(core_name, p) for p in parts[:3])
        lin = {"query": named[q_name], "key": named[k_name], "value": named[v_name], "output": named[out_name]}
        count, size = _head_geometry(m, name or type(m).__name__, lin["query"])
        layout = AttentionLayout(group, core_name, q_name, k_name, v_name, out_name, count, size, style)
        _check_shapes(layout, lin)  # type: ignore[arg-type]
        layouts.append(layout)
    if not layouts:
        raise ValueError(
            f"{type(model).__name__} has no supported attention module: head units need Hugging Face-style "
            "attention (query/key/value Linear layers and an output projection, DistilBERT's "
            "q_lin/k_lin/v_lin/out_lin, Llama's q_proj/k_proj/v_proj/o_proj or GPT-2's c_attn/c_proj)"
        )
    return layouts


def head_units(model: nn.Module) -> list[Unit]:
    """One :class:`~hap.Unit` per attention head, layer by layer, head by head.

    A unit holds its rows of Q, K, V (weights and biases, role ``"out"``) and its columns of the output
    projection (role ``"in"``); ``group`` is the attention module's qualified name, ``index`` the head.
    For ``gqa`` layouts a unit is a KV group (its query heads' rows, its K/V head's rows); for GPT-2 its
    columns of the fused ``c_attn`` (dim 1) and rows of ``c_proj`` (Conv1D weights are ``(in, out)``).

    Raises:
        UnsupportedLayerError: An attention-like module with a layout hap cannot slice (named).
        ValueError: No attention module at all.
    """
    params = dict(model.named_parameters())
    units: list[Unit] = []
    for lay in attention_layouts(model):
        if lay.decoder:
            units += [Unit(lay.name, h, decoder_slices(lay, h, params), kind="head") for h in range(lay.num_heads)]
            continue
        d = lay.head_size
        for h in range(lay.num_heads):
            idx = tuple(range(h * d, (h + 1) * d))
            slices = []
            for lin in (lay.query, lay.key, lay.value):
                slices.append(ParamSlice(f"{lin}.weight", 0, idx, ROLE_OUT))
                if f"{lin}.bias" in params:
                    slices.append(ParamSlice(f"{lin}.bias", 0, idx, ROLE_OUT))
            slices.append(ParamSlice(f"{lay.output}.weight", 1, idx, ROLE_IN))
            units.append(Unit(lay.name, h, tuple(slices), kind="head"))
    return units


# --------------------------------------------------------------------------------------------------
# gates


def by_name(layouts: Sequence[AttentionLayout]) -> dict[str, AttentionLayout]:
    return {lay.name: lay for lay in layouts}


def _check_heads(layouts: Mapping[str, AttentionLayout], heads: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in heads.items():
        if name not in layouts:
            known = ", ".join(list(layouts)[:4]) + (", ..." if len(layouts) > 4 else "")
            raise ValueError(f"'{name}' is not an attention module of this model (they are: {known})")
        hs = sorted({int(i) for i in idx})
        n = layouts[name].num_heads
        bad = [h for h in hs if not 0 <= h < n]
        if bad:
            raise ValueError(f"attention module '{name}' has {n} heads; head index {bad[0]} is out of range")
        out[name] = hs
    return out


@contextmanager
def head_gates(model: nn.Module, gates: Mapping[str, torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Multiply every head's contribution by a gate inside the block (Michel et al.'s ``xi_h``).

    A forward pre-hook on each output projection scales the input columns of head ``h`` by ``gate[h]``;
    a zero gate removes the head exactly as surgery would. Yields ``{attention module: gate}``: the
    given tensors where ``gates`` names a module, ones (float, on the projection's device) elsewhere.
    Set ``requires_grad`` on a gate to differentiate the loss with respect to it.

    Raises:
        ValueError: ``gates`` names a module that is not attention, or a gate of the wrong length.
    """
    layouts = [lay for lay in attention_layouts(model) if lay.num_heads > 0]
    lays = by_name(layouts)
    named = dict(model.named_modules())
    given = dict(gates or {})
    for name, g in given.items():
        if name not in lays:
            raise ValueError(f"gate for '{name}', which is not an attention module with heads")
        if g.shape != (lays[name].num_heads,):
            raise ValueError(f"the gate of '{name}' has shape {tuple(g.shape)}, expected ({lays[name].num_heads},)")
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for lay in layouts:
            proj = named[lay.output]
            gate = given.get(lay.name)
            if gate is None:
                gate = torch.ones(lay.num_heads, dtype=proj.weight.dtype, device=proj.weight.device)
            out[lay.name] = gate
            handles.append(proj.register_forward_pre_hook(_gate_hook(gate, lay.head_size)))
        yield out
    finally:
        for h in handles:
            h.remove()


def _gate_hook(gate: torch.Tensor, head_size: int) -> Callable[..., tuple[Any, ...]]:
    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * gate.repeat_interleave(head_size).to(x.dtype), *args[1:])

    return hook


@contextmanager
def mask_heads(model: nn.Module, heads: Mapping[str, Iterable[int]]) -> Iterator[nn.Module]:
    """Inside the block, ``model`` behaves as if ``heads`` (``{attention module: [head, ...]}``) were
    removed: their gates are zero. The reference for :func:`prune_heads` and a cheap way to evaluate a
    plan before surgery.

    Raises:
        ValueError: An unknown attention module or a head index out of range.
    """
    layouts = by_name([lay for lay in attention_layouts(model) if lay.num_heads > 0])
    checked = _check_heads(layouts, heads)
    named = dict(model.named_modules())
    gates = {}
    for name, hs in checked.items():
        w = named[layouts[name].output].weight
        g = torch.ones(layouts[name].num_heads, dtype=w.dtype, device=w.device)
        g[hs] = 0
        gates[name] = g
    with head_gates(model, gates):
        yield model


# --------------------------------------------------------------------------------------------------
# surgery


class HeadlessAttention(nn.Module):
    """Stands in for an attention core whose heads were all removed.

    Its projections stay as children under their original names (with no rows), so the state dict of a
    pruned model keeps the same keys and shapes whether or not a layer lost every head. ``forward``
    returns an empty ``[..., 0]`` head output (through the output projection when the core owns it,
    which then yields its bias) and no attention weights, as a zero-head attention would.
    """

    def __init__(self, children: Mapping[str, nn.Linear], head_size: int, output: str | None = None) -> None:
        super().__init__()
        for n, lin in children.items():
            self.add_module(n, lin)
        self.output_name = output
        self.num_attention_heads = 0
        self.attention_head_size = head_size
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], 0))
        if self.output_name is not None:
            out = getattr(self, self.output_name)(out)
        return out, None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prune_heads(model: nn.Module, heads_to_remove: Mapping[str, Iterable[int]]) -> nn.Module:
    """Physically remove attention heads, in place: Q/K/V rows and output-projection columns go, and the
    core's head-count attributes (``num_attention_heads``/``n_heads``/``num_heads``, ``all_head_size``)
    follow, so the model computes with fewer heads and gives the outputs of :func:`mask_heads`.

    Args:
        model: The model; modified in place and returned.
        heads_to_remove: ``{attention module name: [head, ...]}``, names as in ``Unit.group`` of
            :func:`head_units`, indices counted in the model as it is *now* (after earlier pruning the
            remaining heads are renumbered ``0..n-1``).

    A layer that loses every head gets a :class:`HeadlessAttention` core: the block then adds only the
    output projection's bias (``dense(0) = bias``). ALBERT-style blocks, whose core also applies the
    residual LayerNorm, must keep at least one head.

    Raises:
        ValueError: An unknown attention module, an index out of range, or all heads of an ALBERT-style
            block.
    """
    layouts = by_name(attention_layouts(model))
    checked = _check_heads(layouts, heads_to_remove)
    named = dict(model.named_modules())
    for name, remove in checked.items():
        if not remove:
            continue
        lay = layouts[name]
        keep = [h for h in range(lay.num_heads) if h not in set(remove)]
        if lay.decoder:
            prune_decoder_heads(model, lay, keep)
            continue
        if not keep and lay.style == "albert":
            raise ValueError(
                f"cannot remove all {lay.num_heads} heads of '{name}': its module also applies the residual "
                "LayerNorm (ALBERT style), so at least one head must stay"
            )
        idx = lay.head_indices(keep)
        for proj in (lay.query, lay.key, lay.value):
            keep_linear(named[proj], idx, 0, True)
        keep_linear(named[lay.output], idx, 1, False)
        core = named[lay.core]
        if keep:
            for attr in _COUNT_ATTRS:
                if isinstance(getattr(core, attr, None), int):
                    setattr(core, attr, len(keep))
            if isinstance(getattr(core, "all_head_size", None), int):
                core.all_head_size = len(keep) * lay.head_size
            continue
        local = {
            proj.rpartition(".")[2]: named[proj]
            for proj in (lay.query, lay.key, lay.value) + ((lay.output,) if lay.style == "fused" else ())
        }
        out_local = lay.output.rpartition(".")[2] if lay.style == "fused" else None
        headless = HeadlessAttention(local, lay.head_size, out_local)
        headless.train(core.training)
        _set_module(model, lay.core, headless)
    return model


class HeadFamily(SlicedFamily):
    """Attention heads of Hugging Face-style encoders (see the module docstring) as a unit family."""

    name = "heads"
    kind = "head"

    def units_of(self, model: nn.Module) -> list[Unit]:
        return head_units(model)

    def remove(self, model: nn.Module, removed: Mapping[str, list[int]]) -> None:
        prune_heads(model, removed)
