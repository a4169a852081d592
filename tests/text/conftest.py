"""Fixtures for the text side: a tiny random BERT saved like a Hugging Face model, its tokenizer, a CSV.

Everything is built offline inside the test (a word-level vocabulary file, a 2-layer BERT), so the tests
run in seconds and never touch the network or the packaged MiniLM.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "love", "nice", "bad", "awful", "hate", "poor", "the", "car", "phone", "day", "is", "a",
         "very", "so", "this", "my", "it", "was"]
POSITIVE = WORDS[:4]
NEGATIVE = WORDS[4:8]
FILLER = WORDS[8:]


def make_tokenizer(directory: Path):
    """A word-level BertTokenizerFast from a vocabulary file written here."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # v5: "vocab", not "vocab_file"


def make_bert(num_labels: int = 2, seed: int = 0, layers: int = 2, heads: int = 4, classifier: bool = True):
    """A 2-layer, 4-head, width-16 BERT (sequence classifier, or the bare encoder)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=16, num_attention_heads=heads, num_hidden_layers=layers,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels, initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # so a few steps learn the toy task
    )
    if classifier:
        return transformers.BertForSequenceClassification(cfg).eval()
    return transformers.BertModel(cfg).eval()


def save_model_dir(directory: Path, num_labels: int = 2, classifier: bool = True, label_names=None) -> Path:
    """A model directory as ``save_pretrained`` writes it, tokenizer included."""
    model = make_bert(num_labels, classifier=classifier)
    if label_names is not None:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {n: i for i, n in enumerate(label_names)}
    model.save_pretrained(directory)
    make_tokenizer(directory).save_pretrained(directory)
    return directory


def write_csv(path: Path, n: int = 90, labels=("negative", "positive"), columns=("text", "label"), seed: int = 0):
    """Short sentences whose label is given by a sentiment word in them (so a model can learn it)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        y = labels[i % len(labels)]
        k = labels.index(y)
        pool = POSITIVE if k == len(labels) - 1 else NEGATIVE if k == 0 else FILLER
        words = [FILLER[int(j)] for j in torch.randint(0, len(FILLER), (4,), generator=gen)]
        words.insert(int(torch.randint(0, 4, (1,), generator=gen)), pool[int(torch.randint(0, 4, (1,), generator=gen))])
        rows.append((" ".join(words) + f" {i}", y))  # the number keeps texts distinct (tokenised as [UNK])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_model_dir(tmp_path / "tiny-bert")


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "tiny.csv")
