"""The vision pipeline as one function: sensitivity -> plan -> surgery -> BN re-estimate -> fine-tune.

The CLI's ``hap prune`` and ``benchmarks/vision_study.py`` both call :func:`prune_and_finetune`, so every
row of a comparison runs the same code and only the criterion (or the allocation) changes. Accuracy is
measured three times: right after surgery with BatchNorm statistics re-estimated (the purest test of a
criterion: without re-estimation every criterion collapses and the comparison says nothing), after
fine-tuning on the validation split (which selects the epoch), and on the test split (reported only).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .finetune import TrainConfig, evaluate, recalibrate_bn, train
from .metrics import count_macs, count_params, latency
from .planner import plan
from .planning import PruningPlan, Target
from .sensitivity import Sensitivity, sensitivity
from .surgery import prune

__all__ = ["PruneConfig", "prune_and_finetune", "evaluate_model", "paired_latency"]


@dataclass
class PruneConfig:
    """Everything that defines one pruning run (saved as the run's config, so it can be rerun)."""

    method: str = "hap"
    target: dict[str, float] = field(default_factory=lambda: {"params": 0.5})
    allocation: str = "uniform"
    implant: str | None = None
    implant_fraction: float = 0.1
    max_layer_ratio: float = 0.95
    round_to: int = 1
    sign: str = "signed"
    rank_by: str = "score"
    scope: str = "all"
    curvature: str = "auto"
    max_samples: int | None = None
    sens_batches: int = 8
    sens_batch_size: int = 128
    bn_batches: int = 40
    seed: int = 0
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_model(model: nn.Module, data: Any, split: str) -> float:
    return float(evaluate(model, data.loader(split, 512))["acc"])


def paired_latency(base: nn.Module, small: nn.Module, batch: torch.Tensor, rounds: int = 7,
                   repeats: int = 5) -> dict[str, float]:
    """CPU latency of two models measured in alternation, one thread, and the median of per-round ratios.

    On a shared machine load comes and goes; timing one model after the other lets a burst land on one
    side only. Alternating short rounds exposes both to the same conditions.
    """
    ratios, tb, ts = [], [], []
    for _ in range(rounds):
        b = latency(base, batch, repeats=repeats, warmup=1, threads=1).median_ms
        s = latency(small, batch, repeats=repeats, warmup=1, threads=1).median_ms
        tb.append(b)
        ts.append(s)
        ratios.append(b / s)
    return {"latency_ms_base": float(np.median(tb)), "latency_ms": float(np.median(ts)),
            "speedup": float(np.median(ratios))}


def _example(data: Any) -> torch.Tensor:
    return torch.zeros(1, data.in_channels, *data.image_size)


def prune_and_finetune(
    model: nn.Module,
    data: Any,
    cfg: PruneConfig,
    *,
    sens: Sensitivity | None = None,
    out_dir: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, PruningPlan, Sensitivity, dict[str, Any]]:
    """Prune a copy of ``model`` as ``cfg`` says and fine-tune it; ``model`` itself is not modified.

    Returns:
        ``(pruned model, plan, sensitivity, metrics)``; metrics hold params/MACs before and after, top-1
        after surgery (BN re-estimated), after fine-tune (val and test), CPU latency and timings.
    """
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"config": cfg.to_dict()}
    gen = torch.Generator().manual_seed(cfg.seed)
    if sens is None:
        loader = data.loader("train", cfg.sens_batch_size, shuffle=True, generator=gen)
        sens = sensitivity(model, F.cross_entropy, loader, method=cfg.method, max_samples=cfg.max_samples,
                           max_batches=cfg.sens_batches, scope=cfg.scope, curvature=cfg.curvature, seed=cfg.seed,
                           progress=progress)
    metrics["sensitivity_s"] = sens.wall_time_s
    example = _example(data)
    t1 = time.perf_counter()
    p = plan(model, sens, Target.from_dict(cfg.target), implant=cfg.implant,
             implant_fraction=cfg.implant_fraction if cfg.implant else 0.0, max_layer_ratio=cfg.max_layer_ratio,
             round_to=cfg.round_to, allocation=cfg.allocation, example_inputs=example, sign=cfg.sign,
             rank_by=cfg.rank_by)
    metrics["plan_s"] = time.perf_counter() - t1
    small = prune(model, p)
    recalibrate_bn(small, data.loader("train", 128, shuffle=True, generator=torch.Generator().manual_seed(cfg.seed)),
                   max_batches=cfg.bn_batches)
    metrics["val_acc_oneshot"] = evaluate_model(small, data, "val")
    metrics["test_acc_oneshot"] = evaluate_model(small, data, "test")
    teacher = None
    if cfg.finetune.kd_alpha > 0:
        teacher = copy.deepcopy(model).eval()
    if cfg.finetune.epochs > 0:
        res = train(small, data, cfg.finetune, out_dir=out_dir, resume=resume, teacher=teacher, progress=progress)
        metrics["finetune_history"] = res.history
        metrics["finetune_s"] = res.seconds
    metrics["val_acc"] = evaluate_model(small, data, "val")
    metrics["test_acc"] = evaluate_model(small, data, "test")
    metrics["params_base"] = count_params(model)
    metrics["params"] = count_params(small)
    metrics["macs_base"] = count_macs(model, example)
    metrics["macs"] = count_macs(small, example)
    metrics["params_removed"] = 1 - metrics["params"] / metrics["params_base"]
    metrics["macs_removed"] = 1 - metrics["macs"] / metrics["macs_base"]
    batch = torch.zeros(64, data.in_channels, *data.image_size)
    metrics.update(paired_latency(model, small, batch))
    metrics["total_s"] = time.perf_counter() - t0
    return small, p, sens, metrics
