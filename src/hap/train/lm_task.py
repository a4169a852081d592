"""The causal-LM task: a decoder LLM trained, scored and measured by the same loop and pipeline as the rest.

A causal LM differs from a text classifier in what it is trained on and judged by, not in how it is
optimised: the batches are token ids with attention masks and their own ids as labels (padding set to
``-100``, :func:`hap.text.lm.lm_labels`), the loss is next-token cross-entropy
(:func:`hap.text.lm.causal_lm_loss`) and the metric held-out perplexity (:func:`hap.text.lm.perplexity`),
lower being better. The optimiser, schedule and step budget are :class:`hap.train.TextTask`'s (AdamW, linear
warm-up and decay, gradient clipping), and so are the splits of :class:`hap.text.TextData`: ``train``
fine-tunes, ``val`` selects, ``score`` calibrates (sensitivity, repair), ``test`` is reported. The texts'
class labels are not used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from .._utils import call_model, eval_mode, model_device
from ..distributed import all_reduce_sum, is_distributed, world_size
from ..text.data import TextLoader
from ..text.lm import IGNORE_INDEX, causal_lm_loss, lm_labels, perplexity
from .tasks import TextTask, kl_per_row

__all__ = ["CausalLMTask", "LMLoader"]

# What a decoder's forward takes: a tokenizer may name more (BERT's token_type_ids), which a Llama refuses.
LM_INPUTS = ("input_ids", "attention_mask")


class LMLoader(TextLoader):
    """:class:`hap.text.TextLoader` over texts alone: ``(inputs, lm_labels(inputs))`` batches, padded per batch.

    The "texts" may also be sequences of token ids already (:class:`hap.text.lm_data.PackedText`'s
    fixed-length rows): those are stacked as they are (cut at ``max_length``), their mask all ones.
    """

    def __init__(self, texts: Any, tokenizer: Any, batch_size: int = 32, **kw: Any) -> None:
        super().__init__(texts, np.zeros(len(texts), dtype=np.int64), tokenizer, batch_size, **kw)
        self.input_names = LM_INPUTS

    def encode(self, texts: Any) -> dict[str, torch.Tensor]:
        if len(texts) and not isinstance(texts[0], str):  # token rows: tokenized (and packed) already
            ids = torch.stack([torch.as_tensor(t, dtype=torch.long)[: self.max_length] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return super().encode(texts)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:  # type: ignore[override]
        for inputs, _ in super().__iter__():
            yield inputs, lm_labels(inputs)


class CausalLMTask(TextTask):
    """Next-token prediction of a Hugging Face ``...ForCausalLM`` on the texts of :class:`hap.text.TextData`.

    Validation keeps the weights of the *lowest* validation perplexity (``TrainResult.best_val_acc`` then holds
    that perplexity: the field is the task's metric); the pipeline reports ``dense_test_ppl``,
    ``test_ppl_surgery``, ``test_ppl_oneshot``, ``val_ppl`` and ``test_ppl`` where a classifier has ``*_acc``.

    Args:
        tokenizer: The model's tokenizer; it needs a pad token (a Llama/GPT-2 one often has none: set
            ``tokenizer.pad_token = tokenizer.eos_token``), since batches are padded and the padding masked.
        max_length: Longest token sequence (training, evaluation, scoring; latency is timed at exactly this).
        eval_batch_size: Texts per evaluation batch.

    Raises:
        ValueError: The tokenizer has no pad token.
    """

    name = "causal-lm"
    metric: ClassVar[str] = "ppl"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, tokenizer: Any, max_length: int = 64, eval_batch_size: int = 64) -> None:
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
            raise ValueError("the tokenizer has no pad token, and causal-LM batches are padded: set "
                             "tokenizer.pad_token = tokenizer.eos_token first")
        super().__init__(tokenizer, max_length=max_length, eval_batch_size=eval_batch_size)

    def _loader(self, data: Any, split: str, batch_size: int, **kw: Any) -> LMLoader:
        texts, _ = data.split(split)
        return LMLoader(texts, self.tokenizer, batch_size, max_length=self.max_length, **kw)

    def split_labels(self, data: Any, split: str) -> torch.Tensor:
        """Every predicted token id of one split, in evaluation order (what a test-set fingerprint hashes)."""
        ys = [y[:, 1:][y[:, 1:] != IGNORE_INDEX] for _, y in self.eval_batches(data, split)]
        return torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Mean next-token cross-entropy over the unpadded tokens (:func:`hap.text.lm.causal_lm_loss`)."""
        return causal_lm_loss(outputs, targets)

    def kd_loss(self, outputs: Any, teacher_outputs: Any, targets: Any, temperature: float) -> torch.Tensor:
        """Per-token distillation over the *predicted* tokens only (the positions :meth:`loss` counts: padding
        and the last position excluded), their mean: the same tokens and the same average as the next-token
        loss, so :meth:`loss_weight`'s token factor makes it exact under ``torch.distributed`` too."""
        logits, teacher = outputs.logits if hasattr(outputs, "logits") else outputs, (
            teacher_outputs.logits if hasattr(teacher_outputs, "logits") else teacher_outputs)
        keep = (targets[:, 1:] != IGNORE_INDEX).to(logits.device)
        if not bool(keep.any()):
            return logits.sum() * 0.0  # nothing predicted in this batch (a stand-in row): no distillation either
        return kl_per_row(logits[:, :-1][keep], teacher[:, :-1][keep], temperature)

    def loss_weight(self, targets: Any, share: float) -> float:
        """``W t_r / T``: this rank's predicted tokens ``t_r`` over the global batch's ``T``, times the ranks ``W``.

        The loss is a mean over tokens, not rows, and padded rows of unequal lengths give the ranks unequal
        token counts: the rows' factor ``W n_r / n`` would weight a token of a rank with short rows more than
        one of a rank with long ones. ``DistributedDataParallel`` averages the ranks' gradients, so with this
        factor the step is exactly one process's on the global batch. ``T`` takes one all-reduce of a scalar
        per step (each rank tokenizes only its own rows); a stand-in row (``share`` 0) counts no token.
        """
        if not is_distributed():
            return share
        mine = int((targets[:, 1:] != IGNORE_INDEX).sum()) if share > 0 else 0
        total = all_reduce_sum(mine)
        return world_size() * mine / total if total > 0 else share  # no token anywhere: every loss is 0

    def batch_stats(self, outputs: Any, targets: Any) -> tuple[int, int]:
        """``(tokens predicted, next-token top-1 hits)``: the train loss is a per-token mean, as perplexity is."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        target = targets[:, 1:].to(logits.device)
        keep = target != IGNORE_INDEX
        hits = (logits[:, :-1].argmax(-1) == target) & keep
        return int(keep.sum()), int(hits.sum())

    def evaluate(self, model: nn.Module, data: Any, split: str) -> dict[str, float]:
        """``{"ppl": perplexity, "loss": its log, the mean next-token NLL}`` on one split."""
        ppl = perplexity(model, self.eval_batches(data, split))
        return {"ppl": ppl, "loss": math.log(ppl)}

    def metric_value(self, model: nn.Module, data: Any, split: str) -> float:
        """Held-out perplexity on one split (lower is better)."""
        return perplexity(model, self.eval_batches(data, split))

    def accuracy(self, model: nn.Module, data: Any, split: str) -> float:
        """Next-token top-1 accuracy on one split (over unpadded tokens); the task's metric is perplexity.

        The classifier's accuracy would compare unshifted ``(batch, tokens)`` predictions with the labels,
        a number that means nothing for a causal LM, so it is replaced rather than inherited.
        """
        hits = count = 0
        device = model_device(model)
        with eval_mode(model), torch.no_grad():
            for inputs, labels in self.eval_batches(data, split):
                out = call_model(model, {k: v.to(device) for k, v in inputs.items()})
                n, h = self.batch_stats(out, labels)
                hits, count = hits + h, count + n
        if count == 0:
            raise ValueError(f"the {split} split has no token to predict (sequences of two or more tokens)")
        return hits / count

    def latency_inputs(self, data: Any, n: int) -> dict[str, torch.Tensor]:
        """``n`` test texts padded to ``max_length`` tokens, mask all ones: every position is computed."""
        texts, _ = data.split("test")
        if len(texts) and not isinstance(texts[0], str):  # token rows (packed): ``n`` of them, repeated if need be
            rows = [texts[i % len(texts)] for i in range(n)]
            return LMLoader(rows, self.tokenizer, n, max_length=self.max_length).encode(rows)
        x = super().latency_inputs(data, n)
        x = {k: v for k, v in x.items() if k in LM_INPUTS}
        x["attention_mask"] = torch.ones_like(x["input_ids"])
        return x
