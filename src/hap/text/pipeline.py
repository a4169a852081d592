"""Head pruning as one function: score heads -> plan -> surgery -> accuracy -> short fine-tune -> accuracy.

``hap heads`` and ``benchmarks/heads_study.py`` both call :func:`prune_heads_and_finetune`, so a row of
the study is exactly what a user gets from the command, and criteria differ only in their scores.
Heads are scored on the ``score`` split (apart from train and test), accuracy is reported on ``test``
right after surgery (no BatchNorm to re-estimate in a transformer, so the one-shot number is already a
fair test of the criterion) and after a fine-tune of a fixed number of steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics import count_macs, count_params
from ..pipeline import paired_latency
from ..planner import plan
from ..planning import PruningPlan, Target
from ..sensitivity import Sensitivity, sensitivity
from ..surgery import prune
from .data import TextData, TextLoader
from .finetune import TextTrainConfig, evaluate_text, train_text

__all__ = ["HeadsConfig", "classifier_loss", "score_heads", "prune_heads_and_finetune", "latency_batch"]

# "obd" is missing: its per-example gradients (torch.func.vmap) fail inside transformers' mask building.
HEAD_METHODS = ("hap", "hap-fisher", "michel", "l1", "magnitude", "l2", "taylor", "random")


def classifier_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a Hugging Face classifier's output (its ``.logits``)."""
    return F.cross_entropy(out.logits, y)


@dataclass
class HeadsConfig:
    """Everything that defines one head-pruning run (saved with it, so it can be rerun).

    Attributes:
        method: Criterion: ``hap-fisher`` (default: HAP's score with Monte-Carlo Fisher traces), ``hap``
            (the paper's Hutchinson Hessian traces), ``michel`` (Michel et al. 2019), ``l1``, ``random``, ...
            The defaults (``hap-fisher`` ranked ``layer_normalized``) are the best HAP row of the heads study
            (docs/results.md); the Hessian's per-head estimates stayed noise at 128 vectors there.
        heads: Fraction of attention heads to remove.
        allocation: ``"global"`` ranking across layers or ``"uniform"`` (the same count per layer).
        sign: How negative HAP estimates rank (see :func:`hap.plan`).
        rank_by: ``"score"`` or ``"layer_normalized"`` (each layer's scores L2-normalised before the global
            ranking, as Michel et al. do; see :func:`hap.plan`).
        max_samples: Hutchinson vectors for ``hap``.
        score_batch_size: Examples per sensitivity batch.
        score_batches: Batches of the score split used (its first ``score_batch_size * score_batches``).
        max_length: Longest token sequence.
        seed: Seeds the sensitivity and the fine-tune.
        finetune: Budget after pruning (``steps=0``: none).
        latency_batch: Texts per batch for the CPU latency comparison.
    """

    method: str = "hap-fisher"
    heads: float = 0.5
    allocation: str = "global"
    sign: str = "signed"
    rank_by: str = "layer_normalized"
    max_samples: int = 128
    score_batch_size: int = 32
    score_batches: int = 16
    max_length: int = 64
    seed: int = 0
    finetune: TextTrainConfig = field(default_factory=lambda: TextTrainConfig(steps=100, lr=5e-5, batch_size=16))
    latency_batch: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_heads(
    model: nn.Module, tokenizer: Any, data: TextData, cfg: HeadsConfig, *, progress: bool = False
) -> Sensitivity:
    """Per-head sensitivity of ``model`` on the ``score`` split with ``cfg.method``."""
    if cfg.method not in HEAD_METHODS:
        raise ValueError(f"unknown method {cfg.method!r} for heads; choose one of {', '.join(HEAD_METHODS)}")
    texts, labels = data.split("score")
    if not texts:
        raise ValueError("the score split is empty: heads are scored on data apart from train and test")
    loader = TextLoader(texts, labels, tokenizer, cfg.score_batch_size, max_length=cfg.max_length,
                        limit=cfg.score_batch_size * cfg.score_batches)
    kw: dict[str, Any] = {}
    method = cfg.method
    if method == "hap":  # the paper's estimator: Hutchinson's Hessian traces
        kw = dict(curvature="hessian", max_samples=cfg.max_samples, min_samples=min(32, cfg.max_samples),
                  samples_per_batch=max(1, min(8, cfg.max_samples)))
    elif method == "hap-fisher":  # same score, Monte-Carlo Fisher curvature: one example = one sample
        method = "hap"
        kw = dict(curvature="fisher")
    sens = sensitivity(model, classifier_loss, loader, units="heads", method=method, max_batches=cfg.score_batches,
                       seed=cfg.seed, progress=progress, **kw)
    sens.settings.update(split="score", examples=len(loader.texts), max_length=cfg.max_length)
    return sens


def latency_batch(tokenizer: Any, data: TextData, n: int, max_length: int) -> dict[str, torch.Tensor]:
    """``n`` test texts padded to ``max_length`` tokens: a fixed-shape batch for timing."""
    texts, _ = data.split("test")
    texts = (texts * (n // max(1, len(texts)) + 1))[:n]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    names = getattr(tokenizer, "model_input_names", None) or ("input_ids", "attention_mask")
    return {k: v for k, v in enc.items() if k in names}


def prune_heads_and_finetune(
    model: nn.Module,
    tokenizer: Any,
    data: TextData,
    cfg: HeadsConfig,
    *,
    sens: Sensitivity | None = None,
    dense_test_acc: float | None = None,
    progress: bool = False,
) -> tuple[nn.Module, PruningPlan, Sensitivity, dict[str, Any]]:
    """Prune ``cfg.heads`` of ``model``'s heads by ``cfg.method`` and fine-tune; ``model`` is not modified.

    Args:
        model: A trained sequence classifier (outputs in ``data.label_names`` order).
        tokenizer: Its tokenizer.
        data: Splits ``score`` (sensitivity), ``train`` (fine-tune) and ``test`` (reported).
        cfg: The run.
        sens: A sensitivity already computed for this model (reused across targets).
        dense_test_acc: The unpruned model's test accuracy, if known (else measured).
        progress: Print progress.

    Returns:
        ``(pruned model, plan, sensitivity, metrics)``; metrics hold heads/params/MACs before and after,
        test accuracy after surgery and after the fine-tune, CPU latency (one thread) and timings.
    """
    t0 = time.perf_counter()
    m: dict[str, Any] = {"config": cfg.to_dict()}
    if dense_test_acc is None:
        dense_test_acc = evaluate_text(model, tokenizer, data, "test", max_length=cfg.max_length)
    m["dense_test_acc"] = dense_test_acc
    if sens is None:
        sens = score_heads(model, tokenizer, data, cfg, progress=progress)
    m.update(sensitivity_s=sens.wall_time_s, sens_samples=sens.samples, sens_split_half=sens.split_half,
             sens_converged=sens.converged)
    t1 = time.perf_counter()
    p = plan(model, sens, Target(heads=cfg.heads), allocation=cfg.allocation, sign=cfg.sign, implant=None,
             rank_by=cfg.rank_by)
    m["plan_s"] = time.perf_counter() - t1
    small = prune(model, p).eval()
    m["test_acc_oneshot"] = evaluate_text(small, tokenizer, data, "test", max_length=cfg.max_length)
    if progress:
        print(f"  {cfg.method}: {p.heads_removed:.0%} heads removed, test accuracy {m['test_acc_oneshot']:.4f} "
              "before fine-tuning", flush=True)
    if cfg.finetune.steps != 0:
        ft = copy.copy(cfg.finetune)
        ft.seed, ft.max_length = cfg.seed, cfg.max_length
        res = train_text(small, tokenizer, data, ft, progress=progress)
        m.update(finetune_steps=res.steps, finetune_s=res.seconds, finetune_history=res.history)
        m["test_acc"] = evaluate_text(small, tokenizer, data, "test", max_length=cfg.max_length)
    else:
        m["finetune_steps"] = 0
        m["test_acc"] = m["test_acc_oneshot"]
    heads_total = sum(g.size for g in p.groups if g.kind == "head")
    m["heads_base"] = heads_total
    m["heads"] = heads_total - sum(len(g.removed) for g in p.groups if g.kind == "head")
    m["heads_removed"] = p.heads_removed
    m["heads_per_layer"] = {g.name: len(g.kept) for g in p.groups if g.kind == "head"}
    m["params_base"], m["params"] = count_params(model), count_params(small)
    m["params_removed"] = 1 - m["params"] / m["params_base"]
    example = p.example_inputs()
    m["macs_base"], m["macs"] = count_macs(model, example), count_macs(small, example)
    m["macs_removed"] = 1 - m["macs"] / max(1, m["macs_base"])
    m["macs_seq_len"] = int(next(iter(example.values())).shape[-1]) if isinstance(example, dict) else None
    batch = latency_batch(tokenizer, data, cfg.latency_batch, cfg.max_length)
    m.update(paired_latency(model, small, batch, rounds=5, repeats=3))  # type: ignore[arg-type]
    m["latency_batch"] = [cfg.latency_batch, cfg.max_length]
    m["total_s"] = time.perf_counter() - t0
    return small, p, sens, m
