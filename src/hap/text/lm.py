"""Causal language modelling: the loss decoder LLMs are pruned with, and held-out perplexity.

Labels follow Hugging Face's convention: ``labels`` are the input ids with ignored positions (padding) set to
``-100``; the model's logits at position ``t`` predict the label at ``t + 1`` (the shift happens here, not in
the data). Perplexity is ``exp`` of the cross-entropy averaged over every predicted token of the whole
held-out set (not an average of per-batch perplexities, which would weight short batches as much as long
ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import call_model, eval_mode, model_device

__all__ = ["IGNORE_INDEX", "lm_labels", "causal_lm_loss", "token_nll", "perplexity"]

IGNORE_INDEX = -100


def lm_labels(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Labels for a causal-LM batch: ``input_ids`` with positions where ``attention_mask == 0`` set to -100."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    labels = ids.clone()
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def token_nll(out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood and the number of tokens predicted.

    Args:
        out: Model output (``.logits`` or a ``(batch, tokens, vocab)`` tensor).
        labels: ``(batch, tokens)`` token ids, ``-100`` where nothing is to be predicted.

    Raises:
        ValueError: Logits and labels disagree in batch or length.
    """
    logits = _logits(out)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"causal-LM logits have shape {tuple(logits.shape)} but labels {tuple(labels.shape)}: pass "
            "(batch, tokens, vocab) logits and (batch, tokens) labels"
        )
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(pred.device)
    pred = pred if pred.dtype == torch.float64 else pred.float()  # half-precision logits: sum in float32
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((target != IGNORE_INDEX).sum())


def causal_lm_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-ignored labels (0 when there is none): the loss
    ``hap.sensitivity`` / training use for a causal LM (``loss_fn(model(inputs), labels)``)."""
    total, n = token_nll(out, labels)
    return total / max(n, 1)


def perplexity(model: nn.Module, batches: Iterable[Any]) -> float:
    """Held-out perplexity: ``exp(sum of token NLLs / number of tokens)`` over every batch, in eval mode.

    Args:
        model: A causal LM (Hugging Face ``...ForCausalLM`` or anything returning ``(batch, tokens, vocab)``).
        batches: ``(inputs, labels)`` pairs, or bare input mappings (labels from :func:`lm_labels`).

    Raises:
        ValueError: No token to predict in any batch, or a non-finite loss.
    """
    total, count = 0.0, 0
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for b in batches:
            inputs, labels = b if isinstance(b, tuple | list) else (b, lm_labels(b))
            if isinstance(inputs, Mapping):
                inputs = {k: v.to(device) for k, v in inputs.items()}
            s, n = token_nll(call_model(model, inputs), labels)
            total += float(s)
            count += n
    if count == 0:
        raise ValueError("perplexity needs at least one token to predict (sequences of two or more tokens)")
    if not math.isfinite(total):
        raise ValueError("the causal-LM loss is not finite: check the model's weights")
    return math.exp(total / count)
