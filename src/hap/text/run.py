"""Reloading a head-pruning run directory (written by ``hap heads`` / ``hap prune --units heads``): its model
(:func:`load_run`) and the task and data it was measured on (:func:`load_run_data`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_run", "load_run_data"]


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


def load_run_data(directory: str | os.PathLike[str], tokenizer: Any, label_names: list[str]) -> tuple[Any, Any]:
    """The task and data a text run was measured on, rebuilt from its ``config.json``: the same source, splits
    and sequence length, so a metric taken on them (``hap eval --run``, ``hap finetune``) is comparable
    with the run's own ``metrics.json`` (a causal LM: the same packed test tokens; a classifier: the same
    test texts, label ids in the saved head's order).

    Args:
        directory: A run directory of ``hap prune --units heads|heads,neurons``.
        tokenizer, label_names: What :func:`load_run` returned for it.

    Returns:
        ``(task, data)``: a :class:`hap.train.CausalLMTask` and :class:`hap.text.lm_data.PackedText` for a causal
        LM, else a :class:`hap.train.TextTask` and :class:`hap.text.TextData`.

    Raises:
        FileNotFoundError: No ``config.json``, or the data it names is gone.
        ValueError: A config that names no data.
    """
    import json

    from ..config import DataOptions  # the one statement of what a run's data_options hold
    from ..train import CausalLMTask, TextTask
    from .data import TWEETS, load_text_data
    from .lm_data import load_lm_texts, pack_texts

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path.parent}' has no config.json: give a directory written by 'hap prune'")
    cfg = json.loads(path.read_text())
    if not cfg.get("data"):
        raise ValueError(f"'{path}' names no data: it was not written by 'hap prune'")
    opts = DataOptions.from_dict(cfg.get("data_options", {}))
    sizes = {"train": opts.train_size, "val": opts.val_size, "score": opts.score_size, "test": opts.test_size}
    seed = int(cfg.get("seed", 0))
    max_length = int(cfg.get("max_length_used") or cfg.get("max_length", 64))
    if not label_names:  # a causal LM: the texts packed into max_length-token rows, as hap prune packed them
        texts = load_lm_texts(cfg["data"], sizes=sizes, seed=seed, text_column=opts.text_column)
        return CausalLMTask(tokenizer, max_length=max_length), pack_texts(texts, tokenizer, max_length)
    data = load_text_data(cfg["data"], classes=opts.classes, sizes=sizes, seed=seed,
                          balance=(cfg["data"] == TWEETS) if opts.balance is None else opts.balance,
                          text_column=opts.text_column, label_column=opts.label_column)
    if list(data.label_names) != list(label_names):
        data = data.with_label_order(label_names)
    return TextTask(tokenizer, max_length=max_length), data
