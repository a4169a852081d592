"""Where ``hap prune`` takes a model and its data from, per unit family: a zoo CNN on an image dataset, or a
local Hugging Face encoder on labelled text. Everything else of a run is shared (:func:`hap.pipeline.run`).
The options saying how a run reads its data, :class:`hap.config.DataOptions`, are the library's (re-exported here)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DataOptions  # re-exported: the CLI's data flags and loaders read it
from ..pipeline import RunConfig
from .common import UserError

__all__ = ["DataOptions", "Loaded", "load_source", "run_defaults", "detect_task", "check_units", "TARGETS",
           "TEXT_UNITS", "TASKS", "CAUSAL_LM"]

# target kinds each unit family (or joint set of families) accepts on the command line
TARGETS = {"channels": ("params", "flops", "channels", "latency"), "heads": ("heads",),
           "heads,neurons": ("flops", "params", "heads"),
           # heads= on query slots counts query heads (a slot is one query head of every KV group)
           "query_slots": ("heads", "params", "flops"), "query_slots,neurons": ("params", "flops", "heads")}
# unit families pruned on a Hugging Face encoder (text data) rather than a zoo CNN
TEXT_UNITS = ("heads", "heads,neurons", "query_slots", "query_slots,neurons")
CAUSAL_LM = "causal-lm"
# what a Hugging Face model directory is pruned as: auto (read from its config.json), a sequence classifier
# (hap.train.TextTask, accuracy) or a decoder LLM (hap.train.CausalLMTask, perplexity)
TASKS = ("auto", "classification", CAUSAL_LM)


def run_defaults(units: str) -> RunConfig:
    """The RunConfig defaults of ``--units`` (the pipeline's, per unit family)."""
    return RunConfig.for_units(units)


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


def check_units(units: str, model: Any) -> None:
    """Refuse ``--units query_slots...`` on a model without grouped-query attention before any compute.

    The family finds out only when it scores (after a dense head may have been trained); asked here, right
    after loading, it fails at once, with the CLI's fix in place of the library's ``units='heads'``.

    Raises:
        UserError: The model has attention that is not GQA (an encoder, GPT-2) or one query head per KV head.
    """
    if not units.startswith("query_slots"):
        return
    from .._utils import first_line
    from ..units import query_slot_units

    try:
        query_slot_units(model)
    except ValueError as e:  # UnsupportedLayerError (an encoder, GPT-2) or one query head per KV head
        why = first_line(e)
        for tail in ("; use units='heads'", ": use units='heads'"):
            why = why.removesuffix(tail)
        fix = units.replace("query_slots", "heads")
        raise UserError(f"--units {units}: {why}: pass --units {fix} (whole heads; KV groups under GQA)") from e


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
    check_units(cfg.units, tm.model)
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
    cfg = cfg.replace(dense=dense, data_options=opts.replace(classes=list(data.label_names), balance=balance,
                                                             task="classification").to_dict())
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


def detect_task(model: str | None) -> str:
    """``"causal-lm"`` or ``"classification"``: what the Hugging Face directory ``model`` holds, from its
    config.json alone (no weights read, transformers not imported).

    Detected rather than asked for because the directory already says what it is, and the wrong guess is
    silent: a Llama loaded as a sequence classifier gets a new, random classification head and would be
    pruned for a task it was never trained on; a classifier loaded as a causal LM loses its head. The
    ``architectures`` a checkpoint was saved with decide (``...ForCausalLM`` / GPT-2's ``...LMHeadModel``:
    a causal LM; ``...ForSequenceClassification``: a classifier, even of a decoder), then a decoder
    ``model_type`` (llama, mistral, qwen2, qwen3, gpt2); anything else is a classifier, as before.
    ``--task`` overrides the guess (e.g. a directory whose config names no architecture).
    """
    import json

    from ..text.lm_data import is_causal_lm_config

    if model is None or not Path(model).expanduser().is_dir():
        return "classification"  # 'minilm' or a name the loader refuses with its own message
    path = Path(model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return "classification"  # no or a broken config.json: the loader says what is wrong
    return CAUSAL_LM if isinstance(config, dict) and is_causal_lm_config(config) else "classification"


def _task_of(cfg: RunConfig) -> str:
    """The task of a run: ``--task`` (``data_options.task``) or, ``auto``, :func:`detect_task`."""
    task = DataOptions.from_dict(cfg.data_options).task
    if task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    return detect_task(cfg.model) if task == "auto" else task


def _lm_model_dir(spec: str | None) -> Path:
    """The local directory of a causal LM (nothing is downloaded), with one-line errors that say what to pass."""
    hint = ("pass a directory holding config.json, the weights and the tokenizer files (written by "
            "save_pretrained, or fetched with 'huggingface-cli download ID --local-dir DIR' on a networked machine)")
    if spec is None:
        raise UserError(f"--task {CAUSAL_LM} needs --model: {hint}")
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise UserError(f"--model '{spec}' is not a local model directory and hap downloads nothing: {hint}")
    if (p / "plan.json").is_file() and (p / "base" / "config.json").is_file():
        raise UserError(f"'{p}' is a 'hap prune' run (an already pruned model): --model needs an unpruned model "
                        "directory (a run's hf/ folder, when it has one, is a plain Hugging Face directory)")
    if not (p / "config.json").is_file():
        raise UserError(f"'{p}' has no config.json, so it is not a Hugging Face model directory: {hint}")
    return p


def load_causal_lm(cfg: RunConfig, progress: bool) -> Loaded:
    """A decoder LLM (``AutoModelForCausalLM``) and its tokenizer from a local directory, offline, on the
    data's texts packed into fixed-length token sequences (:mod:`hap.text.lm_data`), measured by perplexity."""
    from transformers import AutoModelForCausalLM

    from .._utils import first_line
    from ..metrics import count_params
    from ..text.lm_data import check_splits, load_lm_texts, pack_texts
    from ..text.models import _quiet_transformers, load_tokenizer
    from ..train import CausalLMTask
    from .common import offline

    opts = DataOptions.from_dict(cfg.data_options)
    path = _lm_model_dir(cfg.model)
    with offline():  # the CLI sets it already; a library caller of this function is kept offline too
        tokenizer = load_tokenizer(path)
        try:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"'{path}' does not load as a causal LM ({first_line(e)}): pass a ...ForCausalLM "
                            "directory, or --task classification for a sequence classifier") from e
    check_units(cfg.units, model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batches are packed (no padding), but the task needs one
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(cfg.max_length, int(positions)) if positions else cfg.max_length
    sizes = {"train": opts.train_size, "val": opts.val_size, "score": opts.score_size, "test": opts.test_size}
    texts = load_lm_texts(cfg.data, sizes=sizes, seed=cfg.seed, text_column=opts.text_column)
    data = pack_texts(texts, tokenizer, max_length)
    dense = cfg.dense
    if dense is not None and dense.epochs is None and dense.steps is None:  # auto: a causal LM has no new head
        dense = dense.replace(epochs=0.0)
    trains = bool(dense and (dense.epochs or dense.steps)) or bool(cfg.finetune.epochs or cfg.finetune.steps)
    check_splits(data, ["test", "score", *(["train"] if trains else [])])
    if progress:
        print(f"causal LM {path} ({count_params(model):,} params); data {cfg.data}: {max_length}-token sequences "
              + ", ".join(f"{k} {v}" for k, v in data.sizes().items()), flush=True)
    cfg = cfg.replace(dense=dense, data_options=opts.replace(task=CAUSAL_LM, classes=None, balance=None,
                                                             new_head=False).to_dict())
    loaded = Loaded(model, CausalLMTask(tokenizer, max_length=max_length), data, cfg, tokenizer=tokenizer)
    loaded.record = {"model_dir": str(path), "train_epochs_used": float(dense.epochs or 0) if dense else 0.0,
                     "max_length_used": max_length, "data_info": data.describe()}
    _dense_training(loaded, progress)
    if data.sizes().get("val"):
        loaded.metrics["dense_val_ppl"] = loaded.task.metric_value(model, data, "val")
    loaded.dense_test_acc = loaded.task.metric_value(model, data, "test")  # the task's metric: perplexity
    if progress:
        print(f"dense test perplexity {loaded.dense_test_acc:.3f}", flush=True)
    return loaded


def load_source(cfg: RunConfig, progress: bool) -> Loaded:
    """The model, task and data of a run, by unit family and (text) task."""
    task = _task_of(cfg)
    if cfg.units not in TEXT_UNITS:
        if task == CAUSAL_LM:
            raise UserError(f"--units {cfg.units}: '{cfg.model}' is a causal LM, whose units are attention heads "
                            "(or GQA query slots) and feed-forward neurons: pass --units heads or --units "
                            "heads,neurons (channels are the zoo CNNs')")
        return load_vision(cfg, progress)
    return (load_causal_lm if task == CAUSAL_LM else load_text)(cfg, progress)


def save_text_base(out: Path, loaded: Loaded) -> None:
    """``OUT/base``: the unpruned architecture's HF config and the tokenizer (:func:`hap.text.load_run`)."""
    base = out / "base"
    loaded.model.config.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
