"""Causal-LM text: texts only (a .txt file, a CSV's text column, labels ignored), split four ways like the
classifier's data, packed per split into fixed-length token rows that the causal-LM task batches as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hap.text.lm_data import check_splits, is_causal_lm_config, load_lm_texts, pack_texts, read_texts
from hap.train import CausalLMTask

from .conftest import make_tokenizer

pytest.importorskip("transformers")


def _txt(path, n: int):
    words = ["good", "bad", "the", "car", "phone", "day", "is", "very"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(1 + i % 5)) + f" {i}" for i in range(n)]
    path.write_text("\n".join([*lines, "", lines[0]]) + "\n")  # a blank line and a duplicate
    return path, lines


def test_a_text_file_splits_disjointly_and_the_test_split_does_not_move(tmp_path):
    path, lines = _txt(tmp_path / "c.txt", 200)
    assert read_texts(str(path)) == [*lines, lines[0]]
    data = load_lm_texts(str(path), seed=3)
    assert sorted(data.texts) == sorted(lines)  # the blank line skipped, the duplicate once
    idx = [set(data.splits[s].tolist()) for s in ("train", "val", "score", "test")]
    assert sum(map(len, idx)) == len(set().union(*idx)) and data.sizes()["test"] == 20
    small = load_lm_texts(str(path), seed=3, sizes={"train": 10})
    assert small.sizes()["train"] == 10 and small.split("test")[0] == data.split("test")[0]


def test_a_csv_needs_no_label_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("id,body\n" + "".join(f"{i},text number {i}\n" for i in range(30)))
    assert read_texts(str(p), "body")[:2] == ["text number 0", "text number 1"]
    with pytest.raises(ValueError, match="no text column"):
        read_texts(str(p))


def test_packing_puts_eos_between_texts_and_keeps_every_token(tmp_path):
    path, _ = _txt(tmp_path / "c.txt", 120)
    tok = make_tokenizer(tmp_path / "tok")  # BERT-style: [CLS] ... [SEP] closes each text, no EOS added
    data = load_lm_texts(str(path), seed=0)
    packed = pack_texts(data, tok, 8)
    texts, _ = data.split("train")
    stream = [i for t in texts for i in tok(t)["input_ids"]]
    rows = packed.rows["train"]
    assert rows.shape == (len(stream) // 8, 8) and rows.flatten().tolist() == stream[: rows.numel()]
    assert packed.info["tokens"]["train"] == len(stream)
    tok.eos_token = "[SEP]"  # an EOS that already closes each text is not doubled
    assert torch.equal(pack_texts(data, tok, 8).rows["train"], rows)
    tok.eos_token = "[MASK]"  # one that does not is added after every text
    with_eos = pack_texts(data, tok, 8)
    assert with_eos.info["tokens"]["train"] == len(stream) + len(texts)
    first = with_eos.rows["train"].flatten().tolist()[: len(tok(texts[0])["input_ids"]) + 1]
    assert first == [*tok(texts[0])["input_ids"], tok.eos_token_id]
    task = CausalLMTask(tok, max_length=8, eval_batch_size=5)
    inputs, labels = next(iter(task.eval_batches(packed, "train")))
    assert torch.equal(inputs["input_ids"], rows[:5]) and bool((inputs["attention_mask"] == 1).all())
    assert torch.equal(labels, rows[:5])  # nothing padded, every next token predicted
    lat = task.latency_inputs(packed, 7)
    assert lat["input_ids"].shape == (7, 8) and torch.equal(lat["input_ids"][:3], packed.rows["test"][:3])
    assert np.array_equal(packed.split("val")[1], np.zeros(packed.sizes()["val"]))
    with pytest.raises(ValueError, match="fewer than one sequence of 4096"):
        check_splits(pack_texts(data, tok, 4096), ["test"])


def test_causal_lm_configs_are_recognised():
    assert is_causal_lm_config({"architectures": ["LlamaForCausalLM"]})
    assert is_causal_lm_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert not is_causal_lm_config({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"})
    assert is_causal_lm_config({"model_type": "qwen2"}) and not is_causal_lm_config({"model_type": "bert"})
