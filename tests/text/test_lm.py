"""Causal-LM loss and perplexity: against a hand-computed bigram case, and against transformers' own loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from hap.text.lm import IGNORE_INDEX, causal_lm_loss, lm_labels, perplexity, token_nll
from tests._tiny_llm import make_decoder, token_batch

# P[prev][next]: the bigram model below predicts token ``next`` after ``prev`` with this probability
P = [[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(P, dtype=torch.float64).log())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[input_ids]  # (batch, tokens, vocab)


def _batch():
    ids = torch.tensor([[0, 1, 2], [2, 0, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last token of row 2 is padding
    return {"input_ids": ids, "attention_mask": mask}


def test_perplexity_equals_the_hand_computed_value():
    # predicted tokens: 0->1, 1->2 (row 1); 2->0 (row 2; 0->1 is padding and ignored)
    nll = -(math.log(0.25) + math.log(0.7) + math.log(0.6))
    assert perplexity(Bigram(), [_batch()]) == pytest.approx(math.exp(nll / 3), rel=1e-12)
    labels = lm_labels(_batch())
    with torch.no_grad():
        out = Bigram()(**_batch())
    assert labels.tolist() == [[0, 1, 2], [2, 0, IGNORE_INDEX]]
    total, n = token_nll(out, labels)
    assert n == 3 and float(total) == pytest.approx(nll, rel=1e-12)
    assert float(causal_lm_loss(out, labels)) == pytest.approx(nll / 3, rel=1e-12)


def test_perplexity_weights_tokens_not_batches():
    b = _batch()
    one = {k: v[:1] for k, v in b.items()}  # 2 predicted tokens
    two = {k: v[1:] for k, v in b.items()}  # 1 predicted token
    assert perplexity(Bigram(), [one, two]) == pytest.approx(perplexity(Bigram(), [b]), rel=1e-12)
    assert perplexity(Bigram(), [(one, lm_labels(one))]) == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.7))
                                                                              / 2), rel=1e-12)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least one token"):
        perplexity(Bigram(), [{"input_ids": torch.tensor([[1]])}])
    with pytest.raises(ValueError, match="causal-LM logits have shape"):
        causal_lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_loss_matches_transformers_own_causal_lm_loss():
    pytest.importorskip("transformers")
    model = make_decoder("llama")
    x = token_batch(2)
    labels = lm_labels(x)
    with torch.no_grad():
        out = model(**x, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out, labels).double(), out.loss.double(), rtol=1e-6, atol=1e-8)
    assert perplexity(model, [(x, labels)]) == pytest.approx(math.exp(float(out.loss)), rel=1e-6)
