"""Training: one loop (:func:`train`) for every model family, with tasks for what differs.

    from hap.train import TrainConfig, VisionTask, TextTask, train
    train(model, data, TrainConfig(epochs=2, lr=0.01))                        # a CNN on hap.data
    train(clf, text_data, TrainConfig(steps=100), task=TextTask(tokenizer))   # an encoder on hap.text
    train(llm, text_data, TrainConfig(steps=100), task=CausalLMTask(tokenizer))  # a decoder LLM, same texts

A task's :meth:`Task.loss` is what is minimised and its :attr:`Task.metric` what the best weights are kept by
(a causal LM: perplexity, the lowest kept). Accuracy everywhere is :func:`hap.metrics.accuracy` /
:func:`hap.metrics.evaluate` (re-exported here).
"""

from ..metrics import accuracy, classification_loss, evaluate
from .checkpoint import load_weights, save_weights
from .config import MEMORY_FORMATS, SCHEDULES, TrainConfig, TrainResult
from .lm_task import CausalLMTask
from .loop import train
from .tasks import Task, TextTask, VisionTask, pick_memory_format, recalibrate_bn

__all__ = [
    "MEMORY_FORMATS",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "Task",
    "VisionTask",
    "TextTask",
    "CausalLMTask",
    "train",
    "evaluate",
    "accuracy",
    "classification_loss",
    "recalibrate_bn",
    "pick_memory_format",
    "save_weights",
    "load_weights",
]
