"""Where ``hap prune`` takes a model and its data from, per unit family: a zoo CNN on an image dataset, or a
local Hugging Face encoder on labelled text. Everything else of a run is shared (:func:`hap.pipeline.run`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..pipeline import RunConfig
from .common import UserError

__all__ = ["DataOptions", "Loaded", "load_source", "run_defaults", "TARGETS", "TEXT_UNITS"]

# target kinds each unit family (or joint set of families) accepts on the command line
TARGETS = {"channels": ("params", "flops", "channels", "latency"), "heads": ("heads",),
           "heads,neurons": ("flops", "params", "heads")}
# unit families pruned on a Hugging Face encoder (text data) rather than a zoo CNN
TEXT_UNITS = ("heads", "heads,neurons")


def run_defaults(units: str) -> RunConfig:
    """The RunConfig defaults of ``--units`` (the pipeline's, per unit family)."""
    return RunConfig.for_units(units)


@dataclass
class DataOptions(Config):
    """How the CLI reads the data (``RunConfig.data_options``); each family reads its own fields.

    Attributes:
        data_root: Images: folder holding the dataset files, if not the default.
        subset: Images: use only N training images (quick runs).
        text_column, label_column: Text CSV: headers of the texts and labels (default: text, label, ...).
        classes: Text: labels to keep, in id order (tweets default: negative, positive).
        balance: Text: down-sample classes to the smallest (``None``: on for tweets, off for a CSV).
        train_size, val_size, score_size, test_size: Text: at most this many texts per split.
        new_head: Text: replace a trained classification head by a new one for these labels.
    """

    data_root: str | None = None
    subset: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = None
    balance: bool | None = None
    train_size: int = 4000
    val_size: int = 500
    score_size: int = 512
    test_size: int = 1000
    new_head: bool = False


@dataclass
class Loaded:
    """A model, its task and data, the run config resolved against them, and what to record."""

    model: Any
    task: Any
    data: Any
    cfg: RunConfig
    record: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    dense_test_acc: float | None = None
    tokenizer: Any = None


def _dense_training(loaded: Loaded, progress: bool) -> None:
    from ..train import train

    dense = loaded.cfg.dense
    if dense is None or not dense.epochs and not dense.steps:
        return
    if progress:
        print(f"training the dense model: {dense.epochs:g} epoch(s)", flush=True)
    res = train(loaded.model, loaded.data, dense.replace(seed=loaded.cfg.seed), task=loaded.task, progress=progress)
    loaded.metrics.update(dense_train_steps=res.steps, dense_train_s=res.seconds)


def load_vision(cfg: RunConfig, progress: bool) -> Loaded:
    import hap.data
    import hap.models

    from ..train import VisionTask, load_weights

    opts = DataOptions.from_dict(cfg.data_options)
    try:
        data = hap.data.load(cfg.data, root=opts.data_root, seed=cfg.seed, subset=opts.subset)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    torch.manual_seed(cfg.seed)  # an untrained model (no checkpoint) is reproducible too
    try:
        model = hap.models.create(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint)
    else:
        print("note: no --checkpoint given, pruning an untrained model")
    loaded = Loaded(model, VisionTask(), data, cfg)
    _dense_training(loaded, progress)
    loaded.dense_test_acc = loaded.task.accuracy(model, data, "test")
    return loaded


def load_text(cfg: RunConfig, progress: bool) -> Loaded:
    from ..metrics import count_params
    from ..text.data import TWEETS, load_text_data
    from ..text.models import load_text_model
    from ..train import TextTask

    opts = DataOptions.from_dict(cfg.data_options)
    balance = (cfg.data == TWEETS) if opts.balance is None else opts.balance
    sizes = {"train": opts.train_size, "val": opts.val_size, "score": opts.score_size, "test": opts.test_size}
    data = load_text_data(cfg.data, classes=opts.classes, sizes=sizes, balance=balance, seed=cfg.seed,
                          text_column=opts.text_column, label_column=opts.label_column)
    torch.manual_seed(cfg.seed)  # a new classification head is initialised from torch's global generator
    tm = load_text_model(cfg.model, data.label_names, new_head=opts.new_head)
    if tm.label_names != data.label_names:
        data = data.with_label_order(tm.label_names)
    max_length = min(cfg.max_length, tm.max_length)
    if progress:
        print(f"model {tm.path} ({count_params(tm.model):,} params, "
              f"{'new' if tm.new_head else 'trained'} {data.num_labels}-label head); data {cfg.data}: "
              + ", ".join(f"{k} {v}" for k, v in data.sizes().items()), flush=True)
    dense = cfg.dense
    if dense is not None and dense.epochs is None and dense.steps is None:  # auto: train a new head only
        dense = dense.replace(epochs=1.0 if tm.new_head else 0.0)
    if tm.new_head and (dense is None or not (dense.epochs or dense.steps)):
        print("note: the classification head is new and --train-epochs 0: pruning an untrained classifier",
              file=sys.stderr)
    cfg = cfg.replace(dense=dense, data_options=opts.replace(classes=list(data.label_names), balance=balance).to_dict())
    loaded = Loaded(tm.model, TextTask(tm.tokenizer, max_length=max_length), data, cfg, tokenizer=tm.tokenizer)
    loaded.record = {"model_dir": str(tm.path), "label_names": data.label_names, "new_head": tm.new_head,
                     "train_epochs_used": float(dense.epochs or 0) if dense else 0.0, "max_length_used": max_length,
                     "data_info": data.describe()}
    _dense_training(loaded, progress)
    if data.sizes().get("val"):
        loaded.metrics["dense_val_acc"] = loaded.task.accuracy(tm.model, data, "val")
    loaded.dense_test_acc = loaded.task.accuracy(tm.model, data, "test")
    if progress:
        print(f"dense test accuracy {loaded.dense_test_acc:.4f}", flush=True)
    return loaded


def load_source(cfg: RunConfig, progress: bool) -> Loaded:
    return (load_text if cfg.units in TEXT_UNITS else load_vision)(cfg, progress)


def save_text_base(out: Path, loaded: Loaded) -> None:
    """``OUT/base``: the unpruned architecture's HF config and the tokenizer (:func:`hap.text.load_run`)."""
    base = out / "base"
    loaded.model.config.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
