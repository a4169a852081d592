"""``hap heads`` end to end on a tiny random BERT saved to disk and a tiny CSV; bad inputs exit with 2."""

from __future__ import annotations

import json
import shlex

import pytest

from hap.cli import main
from hap.text import load_run, load_text_data
from hap.train import TextTask

from .conftest import save_model_dir, write_csv

FAST = ["--finetune-steps", "3", "--max-samples", "8", "--no-progress", "--threads", "1"]


def test_end_to_end_run_dir_reloads_to_the_reported_accuracy(tmp_path):
    model_dir = save_model_dir(tmp_path / "encoder", classifier=False)  # new head: trained first
    data_file = write_csv(tmp_path / "three.csv", n=60, labels=("neg", "neu", "pos"))
    out = tmp_path / "run"
    rc = main(["heads", "--model", str(model_dir), "--data", str(data_file), "--target", "heads=0.5",
               "--method", "michel", "--out", str(out), *FAST])
    assert rc == 0
    for f in ("config.json", "sensitivity.json", "plan.json", "model.safetensors", "metrics.json", "report.md",
              "heads.png", "base/config.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert m["heads_base"] == 8 and m["heads"] == 4 and m["heads_removed"] == 0.5
    assert 0 < m["params_removed"] < 1 and m["dense_train_steps"] > 0 and m["finetune_steps"] == 3
    assert cfg["label_names"] == ["neg", "neu", "pos"] and cfg["new_head"]
    assert "| attention heads | 8 | 4 (50.0% removed) |" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["target"] == {"heads": 0.5} and {g["kind"] for g in plan["groups"]} == {"head"}

    model, tok, names = load_run(out)
    assert names == ["neg", "neu", "pos"]
    data = load_text_data(str(data_file), sizes={"train": 4000, "val": 500, "score": 512, "test": 1000})
    assert TextTask(tok, max_length=cfg["max_length_used"]).accuracy(model, data, "test") == m["test_acc"]

    rc = main(["heads", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *FAST])
    assert rc == 2  # a run is there: refused without --overwrite

    assert main(["heads", "--model", str(out), "--data", str(data_file), "--out", str(tmp_path / "r2"), *FAST]) == 2

    rerun = shlex.split(cfg["rerun"])  # the recorded command repeats the run exactly
    assert rerun[:2] == ["hap", "heads"]
    assert main([*rerun[1:], "--overwrite", "--no-progress", "--threads", "1"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    for k in ("dense_test_acc", "test_acc_oneshot", "test_acc", "params", "heads_per_layer"):
        assert again[k] == m[k], k


def test_hap_method_with_trained_classifier(tmp_path):
    model_dir = save_model_dir(tmp_path / "clf", num_labels=2)
    out = tmp_path / "run"
    rc = main(["heads", "--model", str(model_dir), "--data", str(write_csv(tmp_path / "d.csv", n=40)),
               "--method", "hap", "--target", "heads=0.25", "--allocation", "uniform", "--out", str(out), *FAST])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "dense_train_steps" not in m  # the head was trained already: no dense fine-tune by default
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["method"] == "hap" and sens["samples"] == 8 and sens["settings"]["split"] == "score"
    assert list(m["heads_per_layer"].values()) == [3, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "bert-base-uncased"], "not a local model directory and hap downloads nothing"),
        (["--data", "COLS"], "no text column: its columns are body, label; needed one named text"),
        (["--data", "THREE"], "has 2 labels (LABEL_0, LABEL_1) but the data has 3 (neg, neu, pos)"),
        (["--data", "MISSING"], "no CSV file"),
        (["--target", "params=0.5"], "must look like heads=0.5"),
        (["--target", "heads=1.5"], "strictly between 0 and 1"),
        (["--classes", "neg,maybe"], "'maybe' do not occur"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    model_dir = save_model_dir(tmp_path / "clf2", num_labels=2)
    files = {
        "COLS": write_csv(tmp_path / "cols.csv", n=20, columns=("body", "label")),
        "THREE": write_csv(tmp_path / "three.csv", n=30, labels=("neg", "neu", "pos")),
        "MISSING": tmp_path / "nope.csv",
    }
    args = {"--model": str(model_dir), "--data": str(write_csv(tmp_path / "ok.csv", n=20, labels=("neg", "pos"))),
            "--out": str(tmp_path / "run")}
    for k, v in zip(extra[::2], extra[1::2], strict=True):
        args[k] = str(files.get(v, v))
    argv = ["heads", *[x for kv in args.items() for x in kv], *FAST]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hap heads: error:") and "\n" not in err
    assert message in err, err
    assert not (tmp_path / "run" / "model.safetensors").exists()
