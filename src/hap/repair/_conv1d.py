"""GPT-2's Conv1D layers as ``nn.Linear`` while repair refits them (the least-squares problems of
:mod:`hap.repair.lsq` are written for a Linear's ``(out, in)`` weight; Conv1D stores ``(in, out)``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..units._sliced import is_conv1d

if TYPE_CHECKING:
    from ._plumbing import _Layer

__all__ = ["conv1d_as_linear"]


@contextmanager
def conv1d_as_linear(small: nn.Module, original: nn.Module, layers: Mapping[str, _Layer]) -> Iterator[None]:
    """Inside the block, GPT-2's Conv1D layers among ``layers`` (and their sources in ``original``) are
    ``nn.Linear`` modules with the transposed weights, so the least-squares problems (written for a Linear's
    ``(out, in)`` weight) apply unchanged; ``layers`` point at the stand-ins. On exit the Conv1D modules are
    put back, the pruned model's with the refit weights copied in (transposed back), and ``layers`` restored.
    """
    named = {id(small): dict(small.named_modules()), id(original): dict(original.named_modules())}
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Linear]] = []
    done: dict[tuple[int, str], nn.Linear] = {}
    relinked: list[tuple[_Layer, nn.Module]] = []

    def swap(model: nn.Module, name: str) -> nn.Linear:
        if (id(model), name) in done:
            return done[(id(model), name)]
        conv = named[id(model)][name]
        lin = nn.Linear(conv.nx, conv.nf, bias=conv.bias is not None, device=conv.weight.device,
                        dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        lin.train(conv.training)
        _set_module(model, name, lin)
        swaps.append((model, name, conv, lin))
        done[(id(model), name)] = lin
        return lin

    try:
        for lay in layers.values():
            if is_conv1d(lay.module):
                relinked.append((lay, lay.module))
                lay.module = swap(small, lay.name)
                swap(original, lay.source)
        yield
    finally:
        for model, name, conv, lin in reversed(swaps):
            if model is small:
                with torch.no_grad():
                    conv.weight.copy_(lin.weight.T)
                    if conv.bias is not None:
                        conv.bias.copy_(lin.bias)
            _set_module(model, name, conv)
        for lay, conv in relinked:
            lay.module = conv


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
