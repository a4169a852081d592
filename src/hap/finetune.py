"""Training and fine-tuning: SGD + momentum, cosine/step schedule, optional distillation, resumable.

One loop serves dense training, fine-tuning after pruning and the "dense + same budget" control, so
every row of a comparison is trained by identical code. A checkpoint (``last.safetensors`` for weights,
``last.json`` for optimiser-free state: epoch, history, best validation accuracy) is written atomically
at the end of every epoch; ``resume=True`` continues from it. Optimiser momentum is saved too, as
tensors, so a resumed run follows the same trajectory. Model selection uses the validation split only.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._utils import atomic_write_text

__all__ = ["TrainConfig", "train", "evaluate", "recalibrate_bn", "save_weights", "load_weights", "pick_memory_format"]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class TrainConfig:
    """How to train. Defaults follow the usual CIFAR ResNet recipe scaled to short CPU runs."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"  # or "step" (x0.1 at 50% and 75% of the epochs)
    warmup_epochs: float = 0.0
    kd_alpha: float = 0.0  # weight of the distillation loss; 0 disables it
    kd_temperature: float = 4.0
    augment: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None
    memory_format: str = "auto"  # "auto" (time both, keep the faster), "channels_last" or "contiguous"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = 0.0
    best_epoch: int = -1
    seconds: float = 0.0
    memory_format: str = "contiguous"


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """``state_dict`` to safetensors, atomically (temp name then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights (no pickle); shape or key mismatches are one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"'{path}' is not a readable safetensors file ({e})") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        if missing:
            detail = f"missing {missing[:3]}"
        elif unexpected:
            detail = f"unexpected {unexpected[:3]}"
        else:
            detail = f"shape of {wrong[:3]}"
        raise ValueError(f"'{path}' holds weights for another architecture ({detail}): check --model and --checkpoint")
    model.load_state_dict(state)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy, model in eval mode (its mode restored after)."""
    was = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    if total == 0:
        raise ValueError("evaluate got no batches")
    return {"acc": correct / total, "loss": loss / total, "n": total}


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
        F.cross_entropy(m(x), y).backward()
        m.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def pick_memory_format(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 3) -> str:
    """Time one forward+backward step in each memory layout on a copy of ``model``; return the faster.

    Whether NHWC (``channels_last``) helps depends on the backend, the layer widths and the image size:
    on CPU it often wins for wide convolutions at large images and loses for thin ones at 28x28, and a
    pruned network is thinner than the one it came from. So it is measured, not assumed: a few steps on
    the real batch cost well under a second, against minutes of training.
    """
    if x.dim() != 4 or not _has_conv(model):
        return "contiguous"
    probe = copy.deepcopy(model).train()  # a copy: BatchNorm statistics and grads of ``model`` stay as they are
    t_std = _step_seconds(probe, x, y, torch.contiguous_format, reps)
    t_cl = _step_seconds(probe, x, y, torch.channels_last, reps)
    return "channels_last" if t_cl < 0.95 * t_std else "contiguous"


def _lr_at(cfg: TrainConfig, epoch_f: float) -> float:
    if cfg.warmup_epochs > 0 and epoch_f < cfg.warmup_epochs:
        return cfg.lr * (epoch_f + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(epoch_f / max(cfg.epochs, 1e-9), 1.0)))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** (int(epoch_f >= 0.5 * cfg.epochs) + int(epoch_f >= 0.75 * cfg.epochs)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use 'cosine' or 'step'")


def _resolve_memory_format(model: nn.Module, data: Any, cfg: TrainConfig) -> str:
    if cfg.memory_format != "auto":
        return cfg.memory_format
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = next(iter(data.loader("train", cfg.batch_size, shuffle=True, augment=False, generator=gen)))
    return pick_memory_format(model, x, y)


def train(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data.train``, select the epoch with the best ``data.val`` accuracy.

    Args:
        model: Trained in place; at return it holds the best-validation weights.
        data: A :class:`hap.data.Dataset` (``loader(split, ...)``).
        cfg: Hyper-parameters.
        out_dir: Where ``last.safetensors``/``best.safetensors``/``train.json`` go (None: keep in memory).
        resume: Continue from ``out_dir``'s last checkpoint.
        teacher: For knowledge distillation (``cfg.kd_alpha > 0``), e.g. the unpruned model.
        progress: Show progress bars.

    Raises:
        RuntimeError: The training loss became NaN/inf (lower the learning rate).
    """
    if cfg.epochs < 0:
        raise ValueError("epochs must be >= 0")
    if cfg.memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {cfg.memory_format!r}")
    out = Path(out_dir) if out_dir is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.momentum > 0)
    result = TrainResult()
    start_epoch = 0
    resumed_format: str | None = None  # a resumed run keeps the layout it started with (same arithmetic)
    best_state: dict[str, torch.Tensor] | None = None
    if resume and out is not None and (out / "last.json").is_file():
        meta = json.loads((out / "last.json").read_text())
        load_weights(model, out / "last.safetensors")
        mom = load_file(str(out / "last_momentum.safetensors")) if (out / "last_momentum.safetensors").is_file() else {}
        for i, p in enumerate(model.parameters()):
            if f"m{i}" in mom:
                opt.state[p]["momentum_buffer"] = mom[f"m{i}"]
        start_epoch = int(meta["epoch"]) + 1
        resumed_format = meta.get("memory_format")
        result.history = meta["history"]
        result.best_val_acc = float(meta["best_val_acc"])
        result.best_epoch = int(meta["best_epoch"])
        gen.manual_seed(cfg.seed + start_epoch)
        if (out / "best.safetensors").is_file():
            best_state = load_file(str(out / "best.safetensors"))
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    fmt = resumed_format or (_resolve_memory_format(model, data, cfg) if start_epoch < cfg.epochs else "contiguous")
    result.memory_format = fmt
    channels_last = fmt == "channels_last"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for epoch in range(start_epoch, cfg.epochs):
        gen.manual_seed(cfg.seed * 1000 + epoch)  # each epoch's order depends only on (seed, epoch): resumable
        loader = data.loader("train", cfg.batch_size, shuffle=True, augment=cfg.augment, generator=gen, drop_last=True)
        steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        model.train()
        seen = correct = 0
        total_loss = 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, epoch + step / steps)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outp = model(x)
            loss = F.cross_entropy(outp, y)
            if teacher is not None and cfg.kd_alpha > 0:
                with torch.no_grad():
                    t_out = teacher(x)
                T = cfg.kd_temperature
                kd = F.kl_div(F.log_softmax(outp / T, 1), F.softmax(t_out / T, 1), reduction="batchmean") * T * T
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"training loss is {loss.item()} at epoch {epoch + 1} step {step}: lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            total_loss += loss.item() * len(y)
            correct += int((outp.argmax(1) == y).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        val = evaluate(model, data.loader("val", 512))
        row = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_acc": val["acc"], "val_loss": val["loss"], "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        result.history.append(row)
        if val["acc"] > result.best_val_acc or best_state is None:
            result.best_val_acc, result.best_epoch = val["acc"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_weights(model, out / "best.safetensors")
        if out is not None:
            save_weights(model, out / "last.safetensors")
            mom = {f"m{i}": opt.state[p]["momentum_buffer"].contiguous()
                   for i, p in enumerate(model.parameters()) if "momentum_buffer" in opt.state[p]}
            tmp = out / ".last_momentum.safetensors.tmp"
            save_file(mom, str(tmp))
            tmp.replace(out / "last_momentum.safetensors")
            atomic_write_text(out / "last.json", json.dumps({
                "epoch": epoch, "history": result.history, "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch, "config": cfg.to_dict(), "memory_format": fmt}, indent=1))
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.3f} "
                       f"acc {row['train_acc']:.4f} | val acc {val['acc']:.4f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    if channels_last:  # hand the model back in the layout it came in
        model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - t0
    return result
