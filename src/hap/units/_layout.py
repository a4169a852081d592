"""Where an attention block keeps its per-head parameters: the record shared by the encoder layouts
(:mod:`hap.units.heads`) and the decoder ones (:mod:`hap.units.decoder`), in its own module so neither
imports the other back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["AttentionLayout"]


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention block keeps its per-head parameters.

    Attributes:
        name: Qualified name of the smallest module owning Q, K, V and the output projection; it is
            the ``group`` of the block's head units and the key of ``prune_heads``/``mask_heads``.
        core: Qualified name of the module whose ``forward`` splits the heads (holds the head count).
        query, key, value, output: Qualified names of the four ``nn.Linear`` layers.
        num_heads: Current number of units (after any pruning): heads, or KV groups for ``gqa``.
        head_size: Width of one unit in the query rows and output-projection columns (``n_rep * head_dim``
            for a ``gqa`` KV group).
        style: ``"split"``, ``"fused"``, ``"albert"``, ``"gqa"`` or ``"gpt2"`` (see the module docstring).
        kv_size: Width of one unit in the key/value rows (0: ``head_size``).
        heads_per_unit: Query heads per unit (``num_key_value_groups`` for ``gqa``, else 1); for ``gqa`` also the
            layer's number of query slots (the ``query_slots`` family, :mod:`hap.units.decoder`).
    """

    name: str
    core: str
    query: str
    key: str
    value: str
    output: str
    num_heads: int
    head_size: int
    style: str
    kv_size: int = 0
    heads_per_unit: int = 1

    @property
    def query_heads(self) -> int:
        """Query heads the block has now."""
        return self.num_heads * self.heads_per_unit

    @property
    def decoder(self) -> bool:
        """A decoder layout (``gqa`` / ``gpt2``), sliced by :mod:`hap.units.decoder`."""
        return self.style in ("gqa", "gpt2")

    def head_indices(self, heads: Iterable[int]) -> torch.Tensor:
        """Row (Q/K/V) or column (output) indices of ``heads``, in order."""
        d = self.head_size
        idx = [i for h in heads for i in range(h * d, (h + 1) * d)]
        return torch.tensor(idx, dtype=torch.long)
