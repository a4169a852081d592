"""What the transformer unit families share: units found structurally, removed by slicing Linear layers in
place, estimated with eager attention (fused kernels have no second derivative on CPU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch.nn as nn

from .._hf import eager_attention
from .base import Unit


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
