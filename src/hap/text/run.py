"""Reloading a head-pruning run directory (written by ``hap heads`` / ``hap prune --units heads``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_run"]


def load_run(directory: str | os.PathLike[str]) -> tuple[torch.nn.Module, Any, list[str]]:
    """Rebuild the pruned classifier of a head-pruning run directory, offline.

    The unpruned architecture comes from ``DIR/base`` (its Hugging Face config: no weights needed, the
    saved ones replace them all), the plan is replayed on it and the saved weights loaded.

    Returns:
        ``(model in eval mode, tokenizer, label names)``; a causal-LM run (``base/config.json`` names a
        ``...ForCausalLM``) gives its ``AutoModelForCausalLM`` and no label names.

    Raises:
        FileNotFoundError: Not a run directory.
        ValueError: Corrupted files (see :func:`hap.load`).
    """
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..io import load
    from .lm_data import is_causal_lm_config
    from .models import _quiet_transformers, load_tokenizer

    d = Path(directory)
    base = d / "base"
    if not (base / "config.json").is_file() or not (d / "plan.json").is_file():
        raise FileNotFoundError(f"'{d}' is not a head-pruning run directory (no plan.json and base/config.json)")
    cfg = AutoConfig.from_pretrained(str(base), local_files_only=True)
    lm = is_causal_lm_config(json.loads((base / "config.json").read_text()))
    with _quiet_transformers():
        skeleton = (AutoModelForCausalLM if lm else AutoModelForSequenceClassification).from_config(cfg)
    model = load(d, skeleton.eval()).eval()
    names = [] if lm else [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
    return model, load_tokenizer(base), names
