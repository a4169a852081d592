"""The one training loop: dense training, fine-tuning after pruning and the dense control, any task.

Every row of a comparison is trained by identical code; a task (:mod:`hap.train.tasks`) supplies only
what differs between families. A checkpoint (weights, optimiser state and the best weights so far, with
``last.json`` holding epoch/step/history/best validation metric and the files' checksums) is written as
one atomic set at the end of every epoch (:func:`hap.train.checkpoint.write_checkpoint`); ``resume=True``
continues from it and follows the same trajectory, because each epoch's order depends only on
``(seed, epoch)``. At the end the kept weights are written to ``best.safetensors``. Model selection uses
the validation split only, never test, and the task's metric in the task's direction (:attr:`Task.metric`,
:meth:`Task.better`: highest accuracy for a classifier, lowest perplexity for a causal LM); the loss minimised
is the task's too (:meth:`Task.loss`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .._utils import call_model, uses_threads
from ..distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_buffers,
    broadcast_object,
    collective,
    data_parallel,
    is_distributed,
    is_main,
    loader_shard,
    rank,
    shard_batch,
    world_size,
)
from ..metrics import logits_of
from .checkpoint import (
    load_optimizer_tensors,
    load_weights,
    optimizer_tensors,
    read_checkpoint,
    resume_differences,
    save_weights,
    write_checkpoint,
)
from .config import TrainConfig, TrainResult
from .tasks import Task, VisionTask

__all__ = ["train"]


@collective
@uses_threads
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
    tag: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``'s train split; keep the weights best on its val split.

    Args:
        model: Trained in place; at return it holds the kept weights, in eval mode.
        data: What ``task`` reads (:class:`hap.data.Dataset` for vision, :class:`hap.text.TextData` for text).
        cfg: Hyper-parameters; ``None`` fields take the task's defaults.
        task: :class:`VisionTask` (default), :class:`TextTask` or :class:`hap.train.CausalLMTask` (then
            ``TrainResult.best_val_acc`` holds the kept weights' validation perplexity, the task's metric).
        out_dir: Where ``last.*``/``best.safetensors`` go (None: keep in memory).
        resume: Continue from ``out_dir``'s last checkpoint. Under a process group rank 0's ``out_dir`` and
            ``resume`` decide: it reads and verifies the checkpoint and every rank continues from it, whatever
            its own arguments (the other ranks of a command line run get a scratch ``out_dir``,
            :func:`hap.distributed.rank0_outputs`, and ``resume=False``); only rank 0 writes.
        teacher: For knowledge distillation (``cfg.kd_alpha > 0``), e.g. the unpruned model.
        progress: Show progress bars (redrawn only on a terminal; a log gets one line per epoch).
        tag: What else identifies the run (model, data), stored with each checkpoint: a resume with
            other values is refused, naming them.
        threads: Torch CPU threads (restored after); ``None``: :func:`hap._utils.default_threads` (or the
            enclosing hap call's count). A resumed run without ``threads`` uses the count it started with:
            gradients of a conv differ in the last bits between thread counts, and resuming must not.

    Raises:
        RuntimeError: The training loss became NaN/inf (lower the learning rate).
        ValueError: A bad option (memory format, schedule, negative epochs), an empty train split, or a
            resume with changed options or from a corrupted checkpoint (the message names which).
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
    ck = read_checkpoint(out) if resume and out is not None and is_main() else None
    if is_distributed():
        # Rank 0 alone holds the run directory: it finds and verifies the checkpoint, and its decision is
        # every rank's (a rank whose out_dir is a scratch path, hap.distributed.rank0_outputs, resumes
        # too); every rank then loads the same files, which rank 0 named (one file system, one node).
        ck = broadcast_object(ck)
        unseen = [f for f in (ck.weights, ck.optimizer) if not f.is_file()] if ck is not None else []
        if unseen:  # another node without the run directory's file system
            raise FileNotFoundError(f"rank {rank()} cannot read '{unseen[0]}', the checkpoint rank 0 resumes from: "
                                    "put the run directory on a file system every node sees, or resume on one node")
    if ck is not None:
        meta = ck.meta
        changed = resume_differences(meta, cfg.to_dict(), tag)
        if changed:
            raise ValueError(f"cannot resume '{out}' with other options ({'; '.join(changed)}): give the options it "
                             "was started with, or start over")
        try:
            load_weights(model, ck.weights)
        except ValueError as e:
            raise ValueError(f"the checkpoint in '{out}' holds another architecture than the model being trained: "
                             "the run was started with other options (model, target, method); give the same "
                             "options, or start over") from e
        load_optimizer_tensors(opt, params, ck.optimizer)
        for p in params:  # the files hold CPU tensors; a model on a GPU needs its state beside it (the step
            state = opt.state.get(p, {})  # counter stays on the CPU, where torch's optimisers keep it)
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    state[k] = v.to(p.device)
        start_epoch = int(meta["epoch"]) + 1
        step = int(meta.get("step", start_epoch * spe))
        resumed_layout = meta.get("memory_format")
        if threads is None and meta.get("threads"):  # same arithmetic as the run it continues
            torch.set_num_threads(int(meta["threads"]))  # @uses_threads restores the caller's count
        result.history = meta["history"]
        result.best_val_acc = meta["best_val_acc"]
        result.best_epoch = int(meta["best_epoch"])
        result.best_step = meta.get("best_step")
        if ck.best.is_file():
            best_state = load_file(str(ck.best))
    if teacher is not None:
        teacher.eval()
    t0 = time.perf_counter()
    layout = task.prepare(model, data, cfg, resumed_layout) if step < total else (resumed_layout or "contiguous")
    # Under torch.distributed: DDP (rank 0's weights to all, gradients averaged), each rank training on its
    # share of every global batch: a loader that shards itself (hap.distributed.loader_shard) loads only
    # that share, any other's global batches are cut here (shard_batch); rank 0 alone writes, the others wait.
    net = data_parallel(model)
    main = is_main()
    result.memory_format = layout
    losses: list[float] = []

    def validate(epoch: int, row: dict[str, Any]) -> None:
        nonlocal best_state
        broadcast_buffers(model)  # every rank evaluates (and keeps) the same model
        val = task.evaluate(model, data, "val")
        model.train()
        value = val[task.metric]
        row.update({f"val_{task.metric}": value, "val_loss": val["loss"]})
        result.history.append(row)
        if task.better(value, result.best_val_acc) or best_state is None:  # the task says which way is better
            result.best_val_acc, result.best_epoch, result.best_step = value, epoch, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for epoch in range(start_epoch, n_epochs):
        model.train()
        seen = correct = 0
        total_loss = 0.0
        steps = min(spe, total - step)
        # disable=None: a bar only on a terminal; a log file would get one redraw per update
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{n_epochs}", disable=None if progress and main else True,
                   leave=False)
        batches = task.train_batches(data, cfg, epoch)
        sharded = loader_shard(batches)
        if sharded is not None and (sharded.rank, sharded.world) != (rank(), world_size()):
            raise ValueError(f"the train batches are sharded for rank {sharded.rank} of {sharded.world}, this "
                             f"is rank {rank()} of {world_size()}: build the loader inside the process group")
        for i, (x, y) in enumerate(batches):
            if i >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = task.lr(cfg, step, total, spe)
            if sharded is None:
                x, y, share = shard_batch(x, y)
            else:  # already this rank's rows: only the loss weight, relative to the global batch
                share = sharded.weight(batches.global_batch_rows(i))
            share = task.loss_weight(y, share)  # the rows' factor, or the task's (a causal LM: its tokens')
            outputs = call_model(net, task.to_input(x, layout))
            loss = task.loss(outputs, y)
            if teacher is not None and cfg.kd_alpha > 0:
                with torch.no_grad():
                    t_out = logits_of(call_model(teacher, x))
                kd = task.kd_loss(outputs, t_out, y, cfg.kd_temperature)
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
            if any_rank(not bool(torch.isfinite(loss))):
                model.eval()
                raise RuntimeError(
                    f"training loss is {loss.item()} at epoch {epoch + 1} step {step}: lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            (loss * share).backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if share > 0:  # weight 0: a stand-in row for a rank with no share of a short batch, not counted
                n, hits = task.batch_stats(outputs, y)
                seen += n
                total_loss += loss.item() * n
                losses.append(loss.item())
                correct += hits
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
            if cfg.eval_every and not task.validate_each_epoch and (step % cfg.eval_every == 0 or step == total):
                validate(epoch, {"step": step, "epoch": epoch,
                                 "loss": float(sum(losses[-cfg.eval_every:]) / max(len(losses[-cfg.eval_every:]), 1))})
        bar.close()
        seen, correct, total_loss = all_reduce_sum(seen), all_reduce_sum(correct), all_reduce_sum(total_loss)
        row = {"epoch": epoch, "step": step, "train_loss": total_loss / max(seen, 1),
               "train_acc": correct / max(seen, 1), "lr": opt.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}
        if task.validate_each_epoch:
            validate(epoch, row)
        if out is not None and main:
            sets = {"last.safetensors": model.state_dict(), "last_optim.safetensors": optimizer_tensors(opt, params)}
            if best_state is not None:
                sets["best.safetensors"] = best_state
            write_checkpoint(out, sets, {
                "epoch": epoch, "step": step, "history": result.history, "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch, "best_step": result.best_step, "config": cfg.to_dict(),
                "memory_format": layout, "threads": torch.get_num_threads(), "task": task.name,
                **({"tag": dict(tag)} if tag is not None else {})})
        # the other ranks wait for rank 0's checkpoint (and learn if writing it failed); whatever their own
        # out_dir (a scratch path, or None): only rank 0's decides what is written
        barrier()
        if progress and main:
            key = f"val_{task.metric}"
            val = f" | val {task.metric} {row[key]:.4f}" if key in row else ""
            tqdm.write(f"epoch {epoch + 1}/{n_epochs}: train loss {row['train_loss']:.3f} "
                       f"acc {row['train_acc']:.4f}{val}")
    if best_state is not None and result.best_step != step:
        model.load_state_dict(best_state)
    task.finish(model, layout)
    model.eval()
    if out is not None and main:
        save_weights(model, out / "best.safetensors")  # the kept weights: what --checkpoint takes
    barrier()
    if not result.history and losses:
        result.history.append({"step": step, "loss": float(sum(losses[-25:]) / len(losses[-25:]))})
    result.steps = step
    result.seconds = time.perf_counter() - t0
    return result
