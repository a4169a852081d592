"""Transformer feed-forward (MLP) neurons as prunable units: discovery, masking and surgery.

A *neuron* ``i`` of a feed-forward block is row ``i`` (weight and bias) of every up projection and
column ``i`` of the down projection: removing it narrows the intermediate width by one and leaves the
block's input and output widths alone, so neurons of different layers never couple (unlike CNN
channels across a residual add) and one group is one block.

Blocks are found *structurally*, by the names and shapes of their ``nn.Linear`` children, from a table
of :class:`MLPAdapter` rows (no model classes, no ``transformers`` import):

- ``bert``: a module with ``intermediate.dense`` (up) and ``output.dense`` (down) — a BERT-style layer
  (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, ...). The group is the layer, e.g. ``bert.encoder.layer.0``.
- ``distilbert``: a module with ``lin1`` (up) and ``lin2`` (down), e.g. ``distilbert.transformer.layer.0.ffn``.
- ``fc``: ``fc1`` (up) and ``fc2`` (down): transformers v5's ViT/DeiT MLP (``vit.encoder.layer.0.mlp``).
- ``gated``: ``gate_proj`` and ``up_proj`` (both up: their rows go together) and ``down_proj`` — the gated
  MLP of Llama, Mistral, Qwen2 (``down(act(gate(x)) * up(x))``), e.g. ``model.layers.0.mlp``.
- ``gpt2``: ``c_fc`` (up) and ``c_proj`` (down), GPT-2's ``Conv1D`` layers, whose weights are stored
  transposed (``(in, out)``): neurons are columns of ``c_fc`` (``up_dim=1``) and rows of ``c_proj``
  (``down_dim=0``), e.g. ``transformer.h.0.mlp``.

A block may lose *every* neuron: ``down(act(up(x)))`` with an intermediate width of 0 is the down
projection's bias (a matrix product over an empty dimension is 0), which ``nn.Linear`` blocks compute
without a special case; :func:`prune_neurons` supports it and the tests check it against the masked
model. GPT-2's Conv1D cannot take an empty input (it reshapes with ``view(-1, 0)``), so a ``gpt2`` block
keeps at least one neuron. The planner keeps one unit per group anyway (its rule for every kind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ._sliced import SlicedFamily, is_conv1d, keep_linear
from .base import ROLE_IN, ROLE_OUT, ParamSlice, Unit, UnsupportedLayerError

__all__ = ["MLPAdapter", "MLPLayout", "ADAPTERS", "mlp_layouts", "neuron_units", "mask_neurons",
           "prune_neurons", "NeuronFamily"]


@dataclass(frozen=True)
class MLPAdapter:
    """One feed-forward layout: where its up and down projections sit below the block module.

    Attributes:
        style: Name of the layout (``"bert"``, ``"distilbert"``).
        up: Relative names of the projections whose outputs are the neurons (two for a gated MLP:
            gate and up rows go together).
        down: Relative name of the projection that reads the neurons.
        up_dim: Dim of an up weight that indexes neurons (0 for ``nn.Linear``, 1 for GPT-2's Conv1D).
        down_dim: Dim of the down weight that indexes neurons (1 for ``nn.Linear``, 0 for Conv1D).
    """

    style: str
    up: tuple[str, ...]
    down: str
    up_dim: int = 0
    down_dim: int = 1


ADAPTERS: tuple[MLPAdapter, ...] = (
    MLPAdapter("bert", ("intermediate.dense",), "output.dense"),
    MLPAdapter("distilbert", ("lin1",), "lin2"),
    MLPAdapter("fc", ("fc1",), "fc2"),
    MLPAdapter("gated", ("gate_proj", "up_proj"), "down_proj"),
    MLPAdapter("gpt2", ("c_fc",), "c_proj", up_dim=1, down_dim=0),
)


@dataclass(frozen=True)
class MLPLayout:
    """One feed-forward block of a model.

    Attributes:
        name: Qualified name of the smallest module owning its projections: the ``group`` of its units.
        up: Qualified names of the up projection(s).
        down: Qualified name of the down projection.
        width: Current intermediate width (neurons left after any pruning).
        adapter: The layout it matched.
    """

    name: str
    up: tuple[str, ...]
    down: str
    width: int
    adapter: MLPAdapter


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_at(named: Mapping[str, nn.Module], name: str, conv1d: bool = False) -> nn.Module | None:
    m = named.get(name)
    return m if (is_conv1d(m) if conv1d else isinstance(m, nn.Linear)) else None


def _match(named: Mapping[str, nn.Module], name: str, ad: MLPAdapter) -> MLPLayout | None:
    conv1d = ad.up_dim == 1  # GPT-2's transposed Conv1D
    ups = [_linear_at(named, _join(name, u), conv1d) for u in ad.up]
    down = _linear_at(named, _join(name, ad.down), conv1d)
    if down is None or any(u is None for u in ups):
        return None
    width = down.weight.shape[ad.down_dim]
    for rel, u in zip(ad.up, ups, strict=True):
        if u.weight.shape[ad.up_dim] != width:  # type: ignore[union-attr]
            raise UnsupportedLayerError(
                f"feed-forward block '{name}': '{rel}' has {u.weight.shape[ad.up_dim]} outputs but "  # type: ignore[union-attr]
                f"'{ad.down}' reads {width} features; hap slices blocks whose up and down widths agree"
            )
    return MLPLayout(name, tuple(_join(name, u) for u in ad.up), _join(name, ad.down), int(width), ad)


def mlp_layouts(model: nn.Module, adapters: Sequence[MLPAdapter] = ADAPTERS) -> list[MLPLayout]:
    """Every feed-forward block of ``model`` that one of ``adapters`` describes, in module order.

    Blocks pruned to width 0 are included (``width == 0``).

    Raises:
        UnsupportedLayerError: A block matches a layout but its widths disagree (named).
        ValueError: The model has no feed-forward block hap recognises.
    """
    named = dict(model.named_modules())
    out: list[MLPLayout] = []
    for name in named:
        for ad in adapters:
            lay = _match(named, name, ad)
            if lay is not None:
                out.append(lay)
                break
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no supported feed-forward block: neuron units need BERT-style "
            "(intermediate.dense -> output.dense), DistilBERT-style (ffn.lin1 -> ffn.lin2), ViT-style "
            "(fc1 -> fc2), gated (gate_proj, up_proj -> down_proj, as Llama) or GPT-2 (mlp.c_fc -> mlp.c_proj) layers"
        )
    return out


def _slices(lay: MLPLayout, idx: tuple[int, ...], params: Mapping[str, Any]) -> tuple[ParamSlice, ...]:
    ad = lay.adapter
    out = []
    for up in lay.up:
        out.append(ParamSlice(f"{up}.weight", ad.up_dim, idx, ROLE_OUT))
        if f"{up}.bias" in params:
            out.append(ParamSlice(f"{up}.bias", 0, idx, ROLE_OUT))
    out.append(ParamSlice(f"{lay.down}.weight", ad.down_dim, idx, ROLE_IN))
    return tuple(out)


def neuron_units(model: nn.Module) -> list[Unit]:
    """One :class:`~hap.Unit` (kind ``"neuron"``) per intermediate neuron, block by block.

    A unit holds its row of each up projection (weight and bias, role ``"out"``) and its column of the
    down projection (role ``"in"``); ``group`` is the block's qualified name, ``index`` the neuron.
    The down projection's bias belongs to no neuron.
    """
    params = dict(model.named_parameters())
    return [Unit(lay.name, i, _slices(lay, (i,), params), kind="neuron")
            for lay in mlp_layouts(model) for i in range(lay.width)]


def _check(layouts: Mapping[str, MLPLayout], neurons: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in neurons.items():
        if name not in layouts:
            known = ", ".join(list(layouts)[:4]) + (", ..." if len(layouts) > 4 else "")
            raise ValueError(f"'{name}' is not a feed-forward block of this model (they are: {known})")
        ns = sorted({int(i) for i in idx})
        bad = [i for i in ns if not 0 <= i < layouts[name].width]
        if bad:
            raise ValueError(f"feed-forward block '{name}' has {layouts[name].width} neurons; index {bad[0]} "
                             "is out of range")
        out[name] = ns
    return out


@contextmanager
def mask_neurons(model: nn.Module, neurons: Mapping[str, Iterable[int]]) -> Iterator[nn.Module]:
    """Inside the block, ``model`` behaves as if ``neurons`` (``{block: [neuron, ...]}``) were removed:
    a pre-hook zeroes their inputs to the down projection (= its columns zeroed). The reference for
    :func:`prune_neurons`.

    Raises:
        ValueError: An unknown block or an index out of range.
    """
    layouts = {lay.name: lay for lay in mlp_layouts(model)}
    checked = _check(layouts, neurons)
    named = dict(model.named_modules())
    handles = []
    try:
        for name, ns in checked.items():
            lay = layouts[name]
            down = named[lay.down]
            gate = torch.ones(lay.width, dtype=down.weight.dtype, device=down.weight.device)
            gate[ns] = 0
            handles.append(down.register_forward_pre_hook(_zero_hook(gate)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _zero_hook(gate: torch.Tensor) -> Callable[..., tuple[Any, ...]]:
    # the down projection's input features are its input's last axis (for Linear and Conv1D alike)
    def hook(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * gate.to(x.dtype), *args[1:])

    return hook


def prune_neurons(model: nn.Module, neurons_to_remove: Mapping[str, Iterable[int]]) -> nn.Module:
    """Physically remove feed-forward neurons, in place, and return ``model``.

    Args:
        model: Modified in place.
        neurons_to_remove: ``{block name: [neuron, ...]}``, names as ``Unit.group`` of :func:`neuron_units`,
            indices counted in the model as it is now. Every neuron of a block may go (except in GPT-2's
            Conv1D blocks): the block then adds only the down projection's bias (see the module docstring).

    Raises:
        ValueError: An unknown block, an index out of range, or every neuron of a ``gpt2`` block.
    """
    layouts = {lay.name: lay for lay in mlp_layouts(model)}
    checked = _check(layouts, neurons_to_remove)
    named = dict(model.named_modules())
    for name, remove in checked.items():
        if not remove:
            continue
        lay = layouts[name]
        gone = set(remove)
        if lay.adapter.style == "gpt2" and len(gone) >= lay.width:
            raise ValueError(
                f"cannot remove all {lay.width} neurons of '{name}': GPT-2's Conv1D cannot take an empty input, "
                "so at least one neuron must stay"
            )
        idx = torch.tensor([i for i in range(lay.width) if i not in gone], dtype=torch.long)
        for up in lay.up:
            keep_linear(named[up], idx, lay.adapter.up_dim, True)  # type: ignore[arg-type]
        keep_linear(named[lay.down], idx, lay.adapter.down_dim, False)  # type: ignore[arg-type]
        if isinstance(getattr(named[name], "intermediate_size", None), int):
            named[name].intermediate_size = len(idx)  # Llama's MLP keeps it as bookkeeping only
    return model


class NeuronFamily(SlicedFamily):
    """Feed-forward neurons of transformer blocks (see the module docstring) as a unit family."""

    name = "neurons"
    kind = "neuron"

    def units_of(self, model: nn.Module) -> list[Unit]:
        return neuron_units(model)

    def remove(self, model: nn.Module, removed: Mapping[str, list[int]]) -> None:
        prune_neurons(model, removed)
