"""Fine-tuning and evaluating text classifiers: AdamW with linear warm-up and decay, as BERT papers do.

Kept apart from :mod:`hap.finetune` (SGD, BatchNorm re-estimation, image batches): transformers want
AdamW without weight decay on biases and LayerNorm, a linear schedule and gradient clipping, and their
batches are keyword tensors. The budget is counted in optimiser steps, so a dense control and a pruned
model can be given exactly the same one.

Model selection never sees the test split: with ``eval_every`` the weights with the best accuracy on
the validation split are restored at the end; without, the last weights are kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import eval_mode
from .data import TextData, TextLoader

__all__ = ["TextTrainConfig", "TextTrainResult", "train_text", "evaluate_text", "accuracy_on"]


@dataclass
class TextTrainConfig:
    """One fine-tuning budget.

    Attributes:
        steps: Optimiser steps; ``None``: ``epochs`` passes over the training split.
        epochs: Passes over the training split when ``steps`` is ``None``.
        lr: Peak learning rate of AdamW.
        batch_size: Training examples per step.
        weight_decay: AdamW decay (not applied to biases and LayerNorm weights).
        warmup: Fraction of the steps over which the learning rate rises linearly from 0.
        max_length: Longest token sequence.
        grad_clip: Largest gradient norm (0: no clipping).
        eval_every: Evaluate on ``val`` every this many steps and keep the best weights (``None``: keep
            the last weights, no validation passes).
        seed: Seeds the order of the training examples.
    """

    steps: int | None = None
    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_length: int = 64
    grad_clip: float = 1.0
    eval_every: int | None = None
    seed: int = 0

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * math.ceil(n_train / self.batch_size)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextTrainResult:
    """What a fine-tune did: steps, time, the validation history and the step whose weights were kept."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float | None = None
    best_step: int | None = None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def accuracy_on(model: nn.Module, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> float:
    """Top-1 accuracy of a classifier (``.logits`` output) over ``(inputs, labels)`` batches, eval mode."""
    right = total = 0
    with eval_mode(model), torch.inference_mode():
        for x, y in batches:
            pred = model(**x).logits.argmax(-1)
            right += int((pred == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("no examples to evaluate on")
    return right / total


def evaluate_text(
    model: nn.Module, tokenizer: Any, data: TextData, split: str, *, batch_size: int = 64, max_length: int = 64,
    limit: int | None = None,
) -> float:
    """Top-1 accuracy on one split of ``data``."""
    texts, labels = data.split(split)
    return accuracy_on(model, TextLoader(texts, labels, tokenizer, batch_size, max_length=max_length, limit=limit))


def train_text(
    model: nn.Module,
    tokenizer: Any,
    data: TextData,
    cfg: TextTrainConfig,
    *,
    progress: bool = False,
    log_every: int = 25,
) -> TextTrainResult:
    """Fine-tune ``model`` in place on ``data``'s train split with cross-entropy.

    Args:
        model: A sequence classifier whose outputs follow ``data.label_names``.
        tokenizer: Its tokenizer.
        data: Uses ``train`` (and ``val`` when ``cfg.eval_every`` is set).
        cfg: The budget and optimiser settings.
        progress: Print a line every ``log_every`` steps.

    Returns:
        Steps run, seconds, validation history; the model ends in eval mode with the kept weights.

    Raises:
        RuntimeError: The loss became NaN or infinite.
    """
    texts, labels = data.split("train")
    if not texts:
        raise ValueError("the train split is empty: nothing to fine-tune on")
    loader = TextLoader(texts, labels, tokenizer, cfg.batch_size, max_length=cfg.max_length, shuffle=True,
                        seed=cfg.seed)
    total = cfg.total_steps(len(texts))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    warm = int(round(cfg.warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    result = TextTrainResult(steps=0, seconds=0.0)
    best_state = None
    t0 = time.perf_counter()
    losses: list[float] = []
    model.train()
    step = 0
    while step < total:
        for x, y in loader:
            loss = F.cross_entropy(model(**x).logits, y)
            if not torch.isfinite(loss):
                model.eval()
                raise RuntimeError(f"the fine-tune loss is {loss.item()} at step {step}: lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if progress and (step % log_every == 0 or step == total):
                print(f"    step {step}/{total}  loss {np.mean(losses[-log_every:]):.4f}  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                acc = evaluate_text(model, tokenizer, data, "val", max_length=cfg.max_length)
                model.train()
                result.history.append({"step": step, "val_acc": acc, "loss": float(np.mean(losses[-cfg.eval_every:]))})
                if result.best_val_acc is None or acc > result.best_val_acc:
                    result.best_val_acc, result.best_step = acc, step
                    best_state = copy.deepcopy(model.state_dict())
            if step >= total:
                break
    if best_state is not None and result.best_step != step:
        model.load_state_dict(best_state)
    model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    if not result.history and losses:
        result.history.append({"step": step, "loss": float(np.mean(losses[-log_every:]))})
    return result
