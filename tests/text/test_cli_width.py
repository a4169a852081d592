"""``hap prune --units heads,neurons --target flops=...`` end to end on a small random BERT directory."""

from __future__ import annotations

import json

import pytest
import torch

from hap.cli import main
from hap.text import load_run, load_text_data
from hap.train import TextTask

from .conftest import WORDS, make_tokenizer, write_csv

transformers = pytest.importorskip("transformers")

FAST = ["--finetune-steps", "2", "--max-samples", "8", "--no-progress", "--threads", "1"]


def save_wide_bert(directory):
    """4 layers x 8 heads of width 4, 128 neurons per block: a head is ~1% of the MACs, so flops=0.4
    can be met within the default ±1%."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_attention_heads=8,
                                  num_hidden_layers=4, intermediate_size=128, max_position_embeddings=32,
                                  num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(directory)
    make_tokenizer(directory).save_pretrained(directory)
    return directory


def test_heads_and_neurons_under_a_flops_target(tmp_path):
    model_dir = save_wide_bert(tmp_path / "bert")
    data_file = write_csv(tmp_path / "d.csv", n=60)
    out = tmp_path / "run"
    rc = main(["prune", "--units", "heads,neurons", "--model", str(model_dir), "--data", str(data_file),
               "--target", "flops=0.4", "--method", "hap-fisher", "--repair", "lsq", "--calibration", "32",
               "--out", str(out), *FAST])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    sens = json.loads((out / "sensitivity.json").read_text())
    assert abs(m["macs_removed"] - 0.4) <= 0.01 and plan["target"] == {"flops": 0.4}
    assert {g["kind"] for g in plan["groups"]} == {"head", "neuron"} and sens["settings"]["units"] == "heads,neurons"
    assert plan["settings"]["tokens"] == m["macs_seq_len"] and plan["settings"]["rank_by"] == "score_per_param"
    assert m["neurons_base"] == 512 and m["neurons"] < 512 and m["repair"] == "lsq"
    assert cfg["units"] == "heads,neurons" and cfg["rerun"].startswith("hap prune --units heads,neurons ")
    model, tok, _ = load_run(out)  # the run directory reloads to the reported accuracy
    data = load_text_data(str(data_file), sizes={"train": 4000, "val": 500, "score": 512, "test": 1000})
    assert TextTask(tok, max_length=cfg["max_length_used"]).accuracy(model, data, "test") == m["test_acc"]


def test_joint_units_refuse_channel_targets(tmp_path, capsys):
    rc = main(["prune", "--units", "heads,neurons", "--model", str(tmp_path), "--target", "channels=0.5",
               "--out", str(tmp_path / "r"), *FAST])
    assert rc == 2 and "flops=" in capsys.readouterr().err
