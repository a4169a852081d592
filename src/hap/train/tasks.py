"""Tasks: what differs between training a CNN on images and an encoder on text, and nothing else.

The loop (:func:`hap.train.train`) is one; a task supplies the task's defaults for the fields of
:class:`TrainConfig` left ``None``, its optimiser and learning-rate schedule, its batches (image tensors
or keyword tensors of a tokenizer), how a model is prepared for training (memory layout) and handed back,
and the batches the pipeline scores units, re-estimates statistics and times latency on.

- :class:`VisionTask`: SGD + Nesterov momentum, cosine/step schedule in epochs, augmentation, BatchNorm
  re-estimation after surgery, ``channels_last`` probed, data = :class:`hap.data.Dataset`.
- :class:`TextTask`: AdamW without decay on biases/LayerNorm, linear warm-up and decay, gradient
  clipping, budget in optimiser steps, data = :class:`hap.text.TextData` and a tokenizer.
- :class:`hap.train.CausalLMTask` (:mod:`hap.train.lm_task`): the text task's optimiser and budget on a
  decoder LLM, its loss next-token cross-entropy and its metric perplexity (lower is better).

What is minimised and what selects the kept weights are hooks too (:meth:`Task.loss`, :attr:`Task.metric`,
:meth:`Task.better`); their defaults are a classifier's cross-entropy and top-1 accuracy, higher better.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Problem
from ..distributed import GlobalBatchShard, broadcast_object
from ..metrics import accuracy, classification_loss, logits_of
from ..metrics import evaluate as evaluate_batches
from .config import TrainConfig

__all__ = ["Task", "VisionTask", "TextTask", "recalibrate_bn", "pick_memory_format"]


def kl_per_row(out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(out / T))`` averaged over the rows of the last axis (one
    distribution per row: a classifier's ``(batch, classes)``, or every position of ``(..., vocab)``)."""
    t = temperature
    out, teacher_out = out.reshape(-1, out.shape[-1]), teacher_out.reshape(-1, teacher_out.shape[-1])
    return F.kl_div(F.log_softmax(out / t, -1), F.softmax(teacher_out / t, -1), reduction="batchmean") * t * t


class Task:
    """Base of the tasks; see the module docstring. Subclasses set ``DEFAULTS`` and the batch methods."""

    name: ClassVar[str] = "task"
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    SCHEDULES: ClassVar[tuple[str, ...]] = ()
    eval_batch_size: int = 256
    validate_each_epoch: ClassVar[bool] = True
    sensitivity_split: ClassVar[str] = "train"
    #: Name of the task's quality metric: the key of :meth:`evaluate`'s value, of the ``val_<metric>``
    #: history rows and of the pipeline's ``*_<metric>*`` numbers (``acc``: exactly the names used before).
    metric: ClassVar[str] = "acc"
    #: Whether a larger :attr:`metric` is better (accuracy) or a smaller one (perplexity): what the loop's
    #: choice of the best validation weights follows.
    higher_is_better: ClassVar[bool] = True

    def resolve(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with every ``None`` field the task has a default for filled in, validated."""
        fill = {k: v for k, v in self.DEFAULTS.items() if getattr(cfg, k) is None}
        cfg = cfg.replace(**fill)
        found = self.problems(cfg)
        if found:
            raise ValueError("; ".join(str(p) for p in found))
        return cfg

    def problems(self, cfg: TrainConfig) -> list[Problem]:
        """:meth:`TrainConfig.problems` and this task's own rules (its schedules), for ``cfg`` as given."""
        out = cfg.problems()
        if cfg.schedule is not None and cfg.schedule not in self.SCHEDULES:
            out.append(Problem("schedule", cfg.schedule, f"must be {' or '.join(self.SCHEDULES)} for {self.name}"))
        return out

    # -- the budget -------------------------------------------------------------------------------
    def steps_per_epoch(self, data: Any, cfg: TrainConfig) -> int:
        raise NotImplementedError

    def total_steps(self, data: Any, cfg: TrainConfig) -> int:
        spe = self.steps_per_epoch(data, cfg)
        if cfg.steps is not None:
            return int(cfg.steps)
        return int(math.ceil(float(cfg.epochs) * spe))

    def lr(self, cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        raise NotImplementedError

    # -- batches ----------------------------------------------------------------------------------
    def train_batches(self, data: Any, cfg: TrainConfig, epoch: int) -> Iterable[tuple[Any, torch.Tensor]]:
        """One epoch's ``(inputs, targets)`` batches, the same on every rank of a process group.

        Either whole global batches, which the loop cuts into this rank's share
        (:func:`hap.distributed.shard_batch`: every rank loads everything), or, cheaper, only this rank's
        rows of each: then the iterable has a ``shard`` attribute (:class:`hap.distributed.GlobalBatchShard`,
        from :meth:`~hap.distributed.GlobalBatchShard.current`) and ``global_batch_rows(b)``, the size of
        global batch ``b``, as hap's vision and text loaders do.
        """
        raise NotImplementedError

    def eval_batches(self, data: Any, split: str) -> Iterable[tuple[Any, torch.Tensor]]:
        raise NotImplementedError

    def accuracy(self, model: nn.Module, data: Any, split: str) -> float:
        """Top-1 accuracy on one split of ``data`` (:func:`hap.metrics.accuracy`)."""
        return accuracy(model, self.eval_batches(data, split))

    # -- what is optimised and measured (a classifier's unless a task says otherwise) ------------------
    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The training and scoring loss of one batch: cross-entropy of a classifier's logits
        (:func:`hap.metrics.classification_loss`). :func:`hap.train.train` minimises it and
        :func:`hap.pipeline.score_units` scores units by it, so a task with another objective (a causal LM)
        changes both by overriding this one method."""
        return classification_loss(outputs, targets)

    def kd_loss(self, outputs: Any, teacher_outputs: Any, targets: Any, temperature: float) -> torch.Tensor:
        """Distillation loss from a teacher's outputs (``TrainConfig.kd_alpha``): the temperature-scaled KL
        divergence per example, averaged as :meth:`loss` is (a classifier: over rows), so that
        :meth:`loss_weight` weights both terms alike under ``torch.distributed``."""
        return kl_per_row(logits_of(outputs), logits_of(teacher_outputs), temperature)

    def loss_weight(self, targets: Any, share: float) -> float:
        """The factor this rank's mean loss is scaled by before backward under ``torch.distributed``.

        ``share`` is the rows' factor (:meth:`hap.distributed.GlobalBatchShard.weight`, ``W n_r / n``), exact
        for a loss that is a mean over rows, as a classifier's is. A task whose loss is a mean over something
        else (a causal LM's: predicted tokens) returns its own factor, so that the ranks' averaged gradient
        is one process's on the whole global batch. Called once per step on every rank.
        """
        return share

    def batch_stats(self, outputs: Any, targets: Any) -> tuple[int, int]:
        """``(predictions, correct ones)`` of one training batch: what the train loss is weighted by and
        the train accuracy counts (a classifier: examples and top-1 hits)."""
        return len(targets), int((logits_of(outputs).argmax(-1) == targets).sum())

    def evaluate(self, model: nn.Module, data: Any, split: str) -> dict[str, float]:
        """``{metric: ..., "loss": ...}`` on one split: what validation records and selects by
        (a classifier: :func:`hap.metrics.evaluate`, top-1 accuracy and mean cross-entropy)."""
        return evaluate_batches(model, self.eval_batches(data, split))

    def metric_value(self, model: nn.Module, data: Any, split: str) -> float:
        """The task's :attr:`metric` on one split, as the pipeline reports it (a classifier: :meth:`accuracy`)."""
        return self.accuracy(model, data, split)

    def better(self, value: float, best: float | None) -> bool:
        """Whether a validation ``value`` of :attr:`metric` beats the ``best`` so far (``None``: none yet)."""
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def has_split(self, data: Any, split: str) -> bool:
        return True

    def split_labels(self, data: Any, split: str) -> torch.Tensor:
        """Every label of one split, in evaluation order (what a test-set fingerprint hashes)."""
        ys = [torch.as_tensor(y).reshape(-1).cpu() for _, y in self.eval_batches(data, split)]
        return torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)

    def split_record(self, data: Any) -> dict[str, Any]:
        """Sizes of the validation and test splits and a short hash of the test labels.

        Two runs are comparable only when they were scored on the same test set; recording its size and
        a fingerprint in metrics.json lets ``hap report`` refuse a comparison across different ones.
        """
        import hashlib

        test = self.split_labels(data, "test").to(torch.int64).numpy()
        rec: dict[str, Any] = {"test_size": int(test.size),
                               "test_labels_sha": hashlib.sha256(test.tobytes()).hexdigest()[:12]}
        rec["val_size"] = int(self.split_labels(data, "val").numel()) if self.has_split(data, "val") else 0
        return rec

    def sensitivity_batches(self, data: Any, batch_size: int, max_batches: int, seed: int) -> Iterable[Any]:
        """The batches units are scored on."""
        raise NotImplementedError

    def example_inputs(self, data: Any) -> Any:
        """One example for counting MACs (``None``: the plan's own)."""
        return None

    def latency_inputs(self, data: Any, n: int) -> Any:
        raise NotImplementedError

    # -- model preparation ------------------------------------------------------------------------
    def prepare(self, model: nn.Module, data: Any, cfg: TrainConfig, resumed: str | None) -> str:
        """Put ``model`` in its training layout; returns the layout's name (saved with a checkpoint)."""
        return "contiguous"

    def to_input(self, x: Any, layout: str) -> Any:
        return x

    def finish(self, model: nn.Module, layout: str) -> None:
        """Hand the model back in the layout it came in."""

    def after_surgery(self, model: nn.Module, data: Any, batches: int, seed: int) -> None:
        """What a pruned model needs before it is measured (vision: BatchNorm statistics)."""


# ------------------------------------------------------------------------------------------------ vision


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], max_batches: int = 50) -> nn.Module:
    """Re-estimate BatchNorm running statistics after surgery (cumulative average over batches).

    Pruning changes what flows into every BatchNorm downstream; stale statistics alone can drop a
    pruned network to chance accuracy, which would hide the quality of the pruning criterion.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m, m.momentum) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i, (x, _) in enumerate(batches):
        if i >= max_batches:
            break
        model(x)
    for m, mom in saved:
        m.momentum = mom
    model.train(was)
    return model


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: torch.memory_format, reps: int) -> float:
    m = model.to(memory_format=fmt)
    x = x.to(memory_format=fmt)
    best = float("inf")
    for i in range(reps + 1):  # the first repetition warms up (allocator, oneDNN kernel choice)
        t0 = time.perf_counter()
        F.cross_entropy(logits_of(m(x)), y).backward()  # a Hugging Face classifier returns .logits
        m.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def pick_memory_format(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 3) -> str:
    """Time one forward+backward step in each memory layout on a copy of ``model``; return the faster.

    Whether NHWC (``channels_last``) helps depends on the backend, the layer widths and the image size:
    on CPU it often wins for wide convolutions at large images and loses for thin ones at 28x28, and a
    pruned network is thinner than the one it came from. So it is measured, not assumed.
    """
    if x.dim() != 4 or not _has_conv(model):
        return "contiguous"
    probe = copy.deepcopy(model).train()  # a copy: BatchNorm statistics and grads of ``model`` stay as they are
    t_std = _step_seconds(probe, x, y, torch.contiguous_format, reps)
    t_cl = _step_seconds(probe, x, y, torch.channels_last, reps)
    return "channels_last" if t_cl < 0.95 * t_std else "contiguous"


class VisionTask(Task):
    """Image classification on a :class:`hap.data.Dataset` (``loader(split, batch_size, ...)``)."""

    name = "vision"
    DEFAULTS = {"epochs": 10, "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "schedule": "cosine",
                "warmup": 0.0, "grad_clip": 0.0}
    SCHEDULES = ("cosine", "step")

    def __init__(self, eval_batch_size: int = 512) -> None:
        self.eval_batch_size = eval_batch_size

    def split_labels(self, data: Any, split: str) -> torch.Tensor:
        return data.split(split).labels

    def _loader(self, data: Any, cfg: TrainConfig, epoch: int, shard: GlobalBatchShard | None = None):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # order depends on (seed, epoch): resumable
        kw: dict[str, Any] = dict(shuffle=True, augment=cfg.augment, generator=gen, drop_last=True)
        if shard is None:
            return data.loader("train", cfg.batch_size, **kw)
        try:
            return data.loader("train", cfg.batch_size, shard=shard, **kw)
        except TypeError as e:  # a user's dataset whose loader takes no shard: it serves global batches,
            if "shard" not in str(e):  # which the loop cuts (hap.distributed.shard_batch)
                raise
            return data.loader("train", cfg.batch_size, **kw)

    def steps_per_epoch(self, data: Any, cfg: TrainConfig) -> int:
        n = len(self._loader(data, cfg, 0))
        return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)

    def total_steps(self, data: Any, cfg: TrainConfig) -> int:
        if cfg.steps is not None:
            return int(cfg.steps)
        return int(cfg.epochs) * self.steps_per_epoch(data, cfg)

    def lr(self, cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
        epoch_f = step / max(steps_per_epoch, 1)
        epochs = total / max(steps_per_epoch, 1)
        warm = cfg.warmup * epochs
        if warm > 0 and epoch_f < warm:
            return cfg.lr * (epoch_f + 1e-3) / warm
        if cfg.schedule == "cosine":
            return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(epoch_f / max(epochs, 1e-9), 1.0)))
        return cfg.lr * (0.1 ** (int(epoch_f >= 0.5 * epochs) + int(epoch_f >= 0.75 * epochs)))

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)

    def train_batches(self, data: Any, cfg: TrainConfig, epoch: int):
        """One epoch's batches; under a process group only this rank's rows of each global batch.

        The loader itself is given the rank's :class:`hap.distributed.GlobalBatchShard` (when ``data.loader``
        takes ``shard=``, as :class:`hap.data.Dataset`'s does), so each rank indexes and augments ``1 / W``
        of every global batch instead of all of it: loading scales with the ranks as the compute does.
        """
        shard = GlobalBatchShard.current()
        return self._loader(data, cfg, epoch, None if shard.whole else shard)

    def eval_batches(self, data: Any, split: str):
        return data.loader(split, self.eval_batch_size)

    def has_split(self, data: Any, split: str) -> bool:
        try:
            return len(data.loader(split, self.eval_batch_size)) > 0
        except (KeyError, ValueError):
            return False

    def sensitivity_batches(self, data: Any, batch_size: int, max_batches: int, seed: int):
        return data.loader("train", batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))

    def example_inputs(self, data: Any) -> torch.Tensor:
        return torch.zeros(1, data.in_channels, *data.image_size)

    def latency_inputs(self, data: Any, n: int) -> torch.Tensor:
        return torch.zeros(n, data.in_channels, *data.image_size)

    def prepare(self, model: nn.Module, data: Any, cfg: TrainConfig, resumed: str | None) -> str:
        fmt = resumed or cfg.memory_format
        if fmt == "auto":
            gen = torch.Generator().manual_seed(cfg.seed)
            x, y = next(iter(data.loader("train", cfg.batch_size, shuffle=True, augment=False, generator=gen)))
            fmt = broadcast_object(pick_memory_format(model, x, y))  # rank 0's timing: one layout on all ranks
        if fmt == "channels_last":
            model.to(memory_format=torch.channels_last)
        return fmt

    def to_input(self, x: Any, layout: str) -> Any:
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    def finish(self, model: nn.Module, layout: str) -> None:
        if layout == "channels_last":
            model.to(memory_format=torch.contiguous_format)

    def after_surgery(self, model: nn.Module, data: Any, batches: int, seed: int) -> None:
        recalibrate_bn(model, data.loader("train", 128, shuffle=True, generator=torch.Generator().manual_seed(seed)),
                       max_batches=batches)


# ------------------------------------------------------------------------------------------------ text


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name


class TextTask(Task):
    """Sequence classification of a Hugging Face encoder on :class:`hap.text.TextData`.

    Args:
        tokenizer: The model's tokenizer.
        max_length: Longest token sequence (training, evaluation, scoring, latency).
        eval_batch_size: Texts per evaluation batch.
    """

    name = "text"
    DEFAULTS = {"epochs": 1.0, "lr": 5e-5, "batch_size": 32, "weight_decay": 0.01, "schedule": "linear",
                "warmup": 0.06, "grad_clip": 1.0}
    SCHEDULES = ("linear",)
    validate_each_epoch = False
    sensitivity_split = "score"

    def split_labels(self, data: Any, split: str) -> torch.Tensor:
        return torch.as_tensor(data.split(split)[1])

    def __init__(self, tokenizer: Any, max_length: int = 64, eval_batch_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval_batch_size = eval_batch_size

    def _loader(self, data: Any, split: str, batch_size: int, **kw: Any):
        from ..text.data import TextLoader

        texts, labels = data.split(split)
        return TextLoader(texts, labels, self.tokenizer, batch_size, max_length=self.max_length, **kw)

    def steps_per_epoch(self, data: Any, cfg: TrainConfig) -> int:
        n = data.sizes().get("train", 0)
        if not n:
            raise ValueError("the train split is empty: nothing to fine-tune on")
        return math.ceil(n / cfg.batch_size)

    def total_steps(self, data: Any, cfg: TrainConfig) -> int:
        if cfg.steps is not None:
            return int(cfg.steps)
        return max(1, super().total_steps(data, cfg))

    def lr(self, cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
        warm = int(round(cfg.warmup * total))
        if step < warm:
            return cfg.lr * (step + 1) / (warm + 1)
        return cfg.lr * max(0.0, (total - step) / max(1, total - warm))

    def optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def train_batches(self, data: Any, cfg: TrainConfig, epoch: int):
        """One pass's batches; under a process group only this rank's rows of each global batch.

        The loader is given the rank's :class:`hap.distributed.GlobalBatchShard`, so each rank tokenizes
        ``1 / W`` of every global batch (tokenizing is the loading cost of text, and on ``W`` GPUs a
        replicated tokenizer would become the bottleneck), in the order one process would draw.
        """
        shard = GlobalBatchShard.current()
        loader = self._loader(data, "train", cfg.batch_size, shuffle=True, seed=cfg.seed,
                              **({} if shard.whole else {"shard": shard}))
        loader.passes = epoch  # the order of a pass depends on (seed, pass): resumable
        return loader

    def eval_batches(self, data: Any, split: str, limit: int | None = None):
        return self._loader(data, split, self.eval_batch_size, limit=limit)

    def has_split(self, data: Any, split: str) -> bool:
        return bool(data.sizes().get(split))

    def sensitivity_batches(self, data: Any, batch_size: int, max_batches: int, seed: int):
        if not data.sizes().get("score"):
            raise ValueError("the score split is empty: heads are scored on data apart from train and test")
        return self._loader(data, "score", batch_size, limit=batch_size * max_batches)

    def latency_inputs(self, data: Any, n: int) -> dict[str, torch.Tensor]:
        """``n`` test texts padded to ``max_length`` tokens: a fixed-shape batch for timing."""
        texts, _ = data.split("test")
        texts = (texts * (n // max(1, len(texts)) + 1))[:n]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        names = getattr(self.tokenizer, "model_input_names", None) or ("input_ids", "attention_mask")
        return {k: v for k, v in enc.items() if k in names}
