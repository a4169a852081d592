"""The one module that reaches into transformers' internals (it never imports transformers itself).

transformers v5 looks the attention implementation up in ``config._attn_implementation_internal`` at
every forward; switching it is the only way to get an attention with a second derivative on CPU. That
private attribute is read and written here only, and ``tests/test_adapters.py`` fails loudly if the
pinned transformers release stops honouring it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn

__all__ = ["eager_attention", "hf_configs"]


def hf_configs(model: nn.Module) -> list[Any]:
    """Every distinct Hugging Face config reachable from the model's modules, sub-configs included."""
    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", None) or ():
            todo.append(getattr(cfg, key, None))
    return list(seen.values())


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with transformers' eager (matmul + softmax) attention inside the block.

    The fused kernels (``sdpa``, flash) have no double-backward on CPU ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), so Hessian-vector
    products need eager attention. v5 modules look the implementation up in ``config._attn_implementation``
    at every forward (and build the attention mask for it), so switching the config is enough. It is set
    on every config found on the model's modules (a plain ``nn.Module`` wrapping a Hugging Face model
    works) and restored on exit. A model without a Hugging Face config passes through unchanged.
    """
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in hf_configs(model)]
    try:
        for cfg, _ in saved:
            cfg._attn_implementation_internal = "eager"
        yield model
    finally:
        for cfg, old in saved:
            cfg._attn_implementation_internal = old
