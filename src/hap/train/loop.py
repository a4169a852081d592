"""The one training loop: dense training, fine-tuning after pruning and the dense control, any task.

Every row of a comparison is trained by identical code; a task (:mod:`hap.train.tasks`) supplies only
what differs between families. A checkpoint (``last.safetensors`` weights, ``last_optim.safetensors``
optimiser state, ``last.json`` epoch/step/history/best validation accuracy) is written atomically at the
end of every epoch; ``resume=True`` continues from it and follows the same trajectory, because each
epoch's order depends only on ``(seed, epoch)``. Model selection uses the validation split only, never test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .._utils import atomic_write_text, call_model
from ..metrics import evaluate, logits_of
from .checkpoint import load_optimizer_tensors, load_weights, optimizer_tensors, save_tensors, save_weights
from .config import TrainConfig, TrainResult
from .tasks import Task, VisionTask

__all__ = ["train"]


def _kd_loss(out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
    T = temperature
    return F.kl_div(F.log_softmax(out / T, -1), F.softmax(teacher_out / T, -1), reduction="batchmean") * T * T


def train(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig | None = None,
    *,
    task: Task | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``data``'s train split; keep the weights best on its val split.

    Args:
        model: Trained in place; at return it holds the kept weights, in eval mode.
        data: What ``task`` reads (:class:`hap.data.Dataset` for vision, :class:`hap.text.TextData` for text).
        cfg: Hyper-parameters; ``None`` fields take the task's defaults.
        task: :class:`VisionTask` (default) or :class:`TextTask`.
        out_dir: Where ``last.*``/``best.safetensors`` go (None: keep in memory).
        resume: Continue from ``out_dir``'s last checkpoint.
        teacher: For knowledge distillation (``cfg.kd_alpha > 0``), e.g. the unpruned model.
        progress: Show progress bars.

    Raises:
        RuntimeError: The training loss became NaN/inf (lower the learning rate).
        ValueError: A bad option (memory format, schedule, negative epochs) or an empty train split.
    """
    task = task or VisionTask()
    cfg = task.resolve(cfg or TrainConfig())
    out = Path(out_dir) if out_dir is not None else None
    spe = task.steps_per_epoch(data, cfg)
    total = task.total_steps(data, cfg)
    n_epochs = -(-total // max(spe, 1))
    params = list(model.parameters())
    opt = task.optimizer(model, cfg)
    result = TrainResult(config=cfg.to_dict())
    start_epoch = step = 0
    resumed_layout: str | None = None  # a resumed run keeps the layout it started with (same arithmetic)
    best_state: dict[str, torch.Tensor] | None = None
    if resume and out is not None and (out / "last.json").is_file():
        meta = json.loads((out / "last.json").read_text())
        load_weights(model, out / "last.safetensors")
        load_optimizer_tensors(opt, params, out / "last_optim.safetensors")
        start_epoch = int(meta["epoch"]) + 1
        step = int(meta.get("step", start_epoch * spe))
        resumed_layout = meta.get("memory_format")
        result.history = meta["history"]
        result.best_val_acc = meta["best_val_acc"]
        result.best_epoch = int(meta["best_epoch"])
        result.best_step = meta.get("best_step")
        if (out / "best.safetensors").is_file():
            best_state = load_file(str(out / "best.safetensors"))
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    layout = task.prepare(model, data, cfg, resumed_layout) if step < total else (resumed_layout or "contiguous")
    result.memory_format = layout
    losses: list[float] = []

    def validate(epoch: int, row: dict[str, Any]) -> None:
        nonlocal best_state
        val = evaluate(model, task.eval_batches(data, "val"))
        model.train()
        row.update(val_acc=val["acc"], val_loss=val["loss"])
        result.history.append(row)
        if result.best_val_acc is None or val["acc"] > result.best_val_acc or best_state is None:
            result.best_val_acc, result.best_epoch, result.best_step = val["acc"], epoch, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_weights(model, out / "best.safetensors")

    for epoch in range(start_epoch, n_epochs):
        model.train()
        seen = correct = 0
        total_loss = 0.0
        steps = min(spe, total - step)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not progress, leave=False)
        for i, (x, y) in enumerate(task.train_batches(data, cfg, epoch)):
            if i >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = task.lr(cfg, step, total, spe)
            logits = logits_of(call_model(model, task.to_input(x, layout)))
            loss = F.cross_entropy(logits, y)
            if teacher is not None and cfg.kd_alpha > 0:
                with torch.no_grad():
                    t_out = logits_of(call_model(teacher, x))
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * _kd_loss(logits, t_out, cfg.kd_temperature)
            if not torch.isfinite(loss):
                model.eval()
                raise RuntimeError(
                    f"training loss is {loss.item()} at epoch {epoch + 1} step {step}: lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            n = len(y)
            seen += n
            total_loss += loss.item() * n
            losses.append(loss.item())
            correct += int((logits.argmax(-1) == y).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
            if cfg.eval_every and not task.validate_each_epoch and (step % cfg.eval_every == 0 or step == total):
                validate(epoch, {"step": step, "epoch": epoch,
                                 "loss": float(sum(losses[-cfg.eval_every:]) / len(losses[-cfg.eval_every:]))})
        bar.close()
        row = {"epoch": epoch, "step": step, "train_loss": total_loss / max(seen, 1),
               "train_acc": correct / max(seen, 1), "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if task.validate_each_epoch:
            validate(epoch, row)
        if out is not None:
            save_weights(model, out / "last.safetensors")
            save_tensors(optimizer_tensors(opt, params), out / "last_optim.safetensors")
            atomic_write_text(out / "last.json", json.dumps({
                "epoch": epoch, "step": step, "history": result.history, "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch, "best_step": result.best_step, "config": cfg.to_dict(),
                "memory_format": layout, "task": task.name}, indent=1))
        if progress:
            val = f" | val acc {row['val_acc']:.4f}" if "val_acc" in row else ""
            tqdm.write(f"epoch {epoch + 1}/{n_epochs}: train loss {row['train_loss']:.3f} "
                       f"acc {row['train_acc']:.4f}{val}")
    if best_state is not None and result.best_step != step:
        model.load_state_dict(best_state)
    task.finish(model, layout)
    model.eval()
    if not result.history and losses:
        result.history.append({"step": step, "loss": float(sum(losses[-25:]) / len(losses[-25:]))})
    result.steps = step
    result.seconds = time.perf_counter() - t0
    return result
