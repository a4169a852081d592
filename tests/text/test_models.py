"""Loading classifiers offline: local directories only, labels checked against the data, new heads."""

from __future__ import annotations

import pytest
import torch

from hap.text.models import MINILM, classifier_labels, load_text_model, resolve_model_dir

from .conftest import save_model_dir


def test_a_hub_id_is_refused_with_how_to_point_at_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"not a local model directory and hap downloads nothing: pass --model minilm"):
        resolve_model_dir("bert-base-uncased")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")


def test_saved_classifier_with_other_label_count_is_refused(tmp_path):
    d = save_model_dir(tmp_path / "clf2", num_labels=2)
    with pytest.raises(ValueError, match=r"has 2 labels \(LABEL_0, LABEL_1\) but the data has 3 \(neg, neu, pos\)"):
        load_text_model(d, ["neg", "neu", "pos"])
    tm = load_text_model(d, ["neg", "neu", "pos"], new_head=True)
    assert tm.new_head and tm.model.config.num_labels == 3


def test_named_labels_must_match_and_set_the_order(tmp_path):
    d = save_model_dir(tmp_path / "named", num_labels=2, label_names=["positive", "negative"])
    assert classifier_labels(load_text_model(d, ["negative", "positive"]).model.config) == ["positive", "negative"]
    tm = load_text_model(d, ["negative", "positive"])
    assert tm.label_names == ["positive", "negative"] and not tm.new_head
    with pytest.raises(ValueError, match="predicts positive, negative but the data is labelled bad, good"):
        load_text_model(d, ["bad", "good"])


def test_base_encoder_gets_a_new_head(tmp_path):
    d = save_model_dir(tmp_path / "enc", classifier=False)
    tm = load_text_model(d, ["a", "b", "c"])
    assert tm.new_head and tm.label_names == ["a", "b", "c"]
    assert tm.model.config.num_labels == 3 and tm.max_length == 32
    x = tm.tokenizer(["good day", "bad car"], padding=True, return_tensors="pt")
    assert tm.model(**x).logits.shape == (2, 3)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    d = tmp_path / "notok"
    save_model_dir(d)
    for f in d.iterdir():
        if "tok" in f.name or f.name in ("vocab.txt", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_text_model(d, ["negative", "positive"])


def test_packaged_minilm_forward_only():
    """The packaged MiniLM loads offline as a 6 x 12-head BERT with a new 2-label head."""
    import hap

    tm = load_text_model(MINILM, ["negative", "positive"])
    assert tm.new_head
    assert [len(lay.head_indices(range(lay.num_heads))) // lay.head_size for lay in hap.attention_layouts(tm.model)] \
        == [12] * 6
    x = tm.tokenizer(["self-driving cars are great"], return_tensors="pt")
    with torch.inference_mode():
        assert tm.model(**x).logits.shape == (1, 2)
