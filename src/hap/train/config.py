"""The one training config (vision and text) and what a training run reports.

A field left ``None`` takes the task's default (:attr:`hap.train.VisionTask.DEFAULTS`,
:attr:`hap.train.TextTask.DEFAULTS`): SGD wants ``lr=0.1``, AdamW on a pretrained encoder ``5e-5``, and one
dataclass states both without pretending one number suits either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config, Problem, in_range

__all__ = ["TrainConfig", "TrainResult", "MEMORY_FORMATS", "SCHEDULES"]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
SCHEDULES = ("cosine", "step", "linear")


@dataclass
class TrainConfig(Config):
    """How to train, for every task (dense training, fine-tune after pruning, the dense control).

    Attributes:
        epochs: Passes over the training split (vision: whole epochs; ``None``: 10 vision, 1 text).
        steps: Total optimiser steps; overrides ``epochs`` when set (the text budget; ``0``: no training).
        max_steps_per_epoch: Vision: at most this many steps per epoch (short fine-tunes).
        lr: Peak learning rate (``None``: 0.1 for SGD/vision, 5e-5 for AdamW/text).
        batch_size: Training examples per step (``None``: 128 vision, 32 text).
        weight_decay: ``None``: 5e-4 vision; 0.01 text, where biases and LayerNorm weights get none.
        momentum: Vision: SGD momentum (Nesterov when > 0).
        schedule: ``"cosine"`` or ``"step"`` (x0.1 at 50% and 75%; vision), ``"linear"`` decay (text).
            ``None``: cosine for vision, linear for text.
        warmup: Fraction of the budget over which the learning rate rises linearly (``None``: 0 vision,
            0.06 text).
        grad_clip: Largest gradient norm, 0 = off (``None``: 0 vision, 1.0 text).
        kd_alpha: Weight of the distillation loss from a teacher (0: off).
        kd_temperature: Softmax temperature of the distillation loss.
        augment: Vision: random crops and flips of the training images.
        memory_format: Vision: ``"auto"`` (time both layouts on one batch, keep the faster),
            ``"channels_last"`` or ``"contiguous"``.
        eval_every: Text: validate every this many steps and keep the best weights (``None``: keep the last
            weights). Vision validates after every epoch and always keeps the best epoch.
        seed: Seeds the order of the training examples (and augmentation).
    """

    epochs: float | None = None
    steps: int | None = None
    max_steps_per_epoch: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    schedule: str | None = None
    warmup: float | None = None
    grad_clip: float | None = None
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    augment: bool = True
    memory_format: str = "auto"
    eval_every: int | None = None
    seed: int = 0

    def problems(self) -> list[Problem]:
        """The rules every task shares (:meth:`hap.train.Task.problems` adds the task's own)."""
        out = super().problems()
        if self.epochs is not None and not in_range(self.epochs, 0):
            out.append(Problem("epochs", self.epochs, "must be >= 0"))
        if self.steps is not None and not in_range(self.steps, 0, integer=True):
            out.append(Problem("steps", self.steps, "must be an integer >= 0"))
        if self.lr is not None and not in_range(self.lr, 0, lo_open=True):
            out.append(Problem("lr", self.lr, "must be > 0"))
        if self.batch_size is not None and not in_range(self.batch_size, 1, integer=True):
            out.append(Problem("batch_size", self.batch_size, "must be an integer >= 1"))
        if self.memory_format not in MEMORY_FORMATS:
            out.append(Problem("memory_format", self.memory_format, f"must be one of {', '.join(MEMORY_FORMATS)}"))
        return out


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        history: One row per validation (or per epoch): step, epoch, losses, accuracies, lr, seconds.
        best_val_acc: Validation accuracy of the kept weights (``None``: no validation ran).
        best_epoch: Epoch (0-based) of the kept weights, -1 if none.
        best_step: Optimiser step of the kept weights (``None``: the last weights were kept).
        steps: Optimiser steps run in total (resumed ones included).
        seconds: Wall time of this call.
        memory_format: The layout the model was trained in.
        config: The resolved config (task defaults filled in).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int = -1
    best_step: int | None = None
    steps: int = 0
    seconds: float = 0.0
    memory_format: str = "contiguous"
    config: dict = field(default_factory=dict)
