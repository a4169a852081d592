"""What the transformer unit families share: units found structurally, removed by slicing Linear layers in
place, estimated with eager attention (fused kernels have no second derivative on CPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

from .._hf import eager_attention
from .base import Unit


def is_conv1d(m: object) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``, recognised without importing transformers: a Linear
    whose weight is stored transposed, ``(nx = in, nf = out)``."""
    return (isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(getattr(m, "nx", None), int) and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2)


def keep_linear(lin: nn.Module, idx: torch.Tensor, dim: int, outputs: bool) -> None:
    """Keep entries ``idx`` along weight dim ``dim`` of ``lin`` (an ``nn.Linear`` or GPT-2's Conv1D), in place
    (the module object, its hooks and its name stay); ``outputs``: they are the layer's outputs, so its bias
    is sliced too and its output width (``out_features`` / ``nf``) follows, else its input width."""
    conv1d = is_conv1d(lin)
    with torch.no_grad():
        w = lin.weight
        lin.weight = nn.Parameter(w.index_select(dim, idx.to(w.device)).clone(), requires_grad=w.requires_grad)
        if outputs:
            if lin.bias is not None:
                b = lin.bias
                lin.bias = nn.Parameter(b.index_select(0, idx.to(b.device)).clone(), requires_grad=b.requires_grad)
            setattr(lin, "nf" if conv1d else "out_features", len(idx))
        else:
            setattr(lin, "nx" if conv1d else "in_features", len(idx))


class SlicedFamily:
    """Base of :class:`~hap.units.heads.HeadFamily` and :class:`~hap.units.neurons.NeuronFamily`.

    Subclasses set ``name``/``kind`` and implement ``units_of(model)`` and ``remove(model, {group: [i]})``.
    """

    name = ""
    kind = ""

    def units_of(self, model: nn.Module) -> list[Unit]:
        raise NotImplementedError

    def remove(self, model: nn.Module, removed: Mapping[str, list[int]]) -> None:
        raise NotImplementedError

    def discover(self, model: nn.Module, example_inputs: Any = None, exclude: Sequence[str] = ()) -> list[Unit]:
        units = self.units_of(model)
        if exclude:
            units = [u for u in units if u.group not in set(exclude)]
        return units

    def apply(self, model: nn.Module, removed: Mapping[str, Sequence[int]], example_inputs: Any = None) -> None:
        self.remove(model, {g: list(ix) for g, ix in removed.items() if ix})

    def estimation_context(self, model: nn.Module) -> AbstractContextManager[Any]:
        return eager_attention(model)
