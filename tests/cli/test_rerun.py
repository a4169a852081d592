"""``config.json`` of a run is its resolved RunConfig: ``hap prune --config RUN/config.json --out NEW`` reruns
it, for channels and for heads (``hap prune --units heads`` = ``hap heads``); commands restore process state."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hap.cli import main
from hap.cli.prune import load_run_config
from hap.pipeline import RunConfig

FAST_HEADS = ["--finetune-steps", "2", "--max-samples", "8", "--no-progress", "--threads", "1"]


def _same_results(a, b, keys):
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in keys:
        assert ma[k] == mb[k], k


def test_vision_config_rerun(fmnist_dir, tmp_path):
    run = tmp_path / "l1"
    assert main(["prune", "--data-root", str(fmnist_dir), "--subset", "120", "--method", "l1", "--target",
                 "params=0.4", "--finetune-epochs", "0", "--out", str(run), "--no-progress"]) == 0
    cfg = load_run_config(run / "config.json")
    assert cfg.units == "channels" and cfg.sensitivity.method == "l1" and cfg.target == {"params": 0.4}
    assert cfg.data_options["subset"] == 120 and cfg.model == "resnet20"
    again = tmp_path / "again"
    assert main(["prune", "--config", str(run / "config.json"), "--out", str(again), "--no-progress"]) == 0
    _same_results(run, again, ["params", "macs", "test_acc_oneshot", "test_acc"])
    assert load_run_config(again / "config.json") == cfg
    # an option given with --config overrides the file
    other = tmp_path / "other"
    assert main(["prune", "--config", str(run / "config.json"), "--target", "params=0.6", "--out", str(other),
                 "--no-progress"]) == 0
    assert load_run_config(other / "config.json").target == {"params": 0.6}
    # a config whose units contradict --units, or a typo'd key, is one clear error
    assert main(["prune", "--config", str(run / "config.json"), "--units", "heads", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    bad = json.loads((run / "config.json").read_text())
    bad["allocaton"] = "global"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["prune", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "y"), "--no-progress"]) == 2


def test_prune_units_heads_matches_hap_heads_and_reruns(tmp_path):
    pytest.importorskip("transformers")
    from ..text.conftest import save_model_dir, write_csv

    model_dir = save_model_dir(tmp_path / "clf", num_labels=2)
    data = write_csv(tmp_path / "d.csv", n=40)
    common = ["--model", str(model_dir), "--data", str(data), "--method", "l1", "--target", "heads=0.5", *FAST_HEADS]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["prune", "--units", "heads", *common, "--out", str(a)]) == 0
    assert main(["heads", *common, "--out", str(b)]) == 0
    keys = ["dense_test_acc", "test_acc_oneshot", "test_acc", "params", "heads_per_layer"]
    _same_results(a, b, keys)
    cfg = load_run_config(a / "config.json")
    assert cfg.units == "heads" and cfg.target == {"heads": 0.5} and cfg.finetune.steps == 2
    assert main(["prune", "--config", str(a / "config.json"), "--out", str(c), "--no-progress"]) == 0
    _same_results(a, c, keys)
    # the units are inferred from the model when not given
    d = tmp_path / "d"
    assert main(["prune", *common, "--out", str(d)]) == 0
    assert load_run_config(d / "config.json").units == "heads"


def test_configs_round_trip_through_json():
    from hap.train import TrainConfig

    for cfg in (RunConfig(), RunConfig.for_units("heads"), RunConfig.for_units("channels", seed=3, repair="x")):
        back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.finetune, TrainConfig)
    t = TrainConfig(epochs=2, steps=5, lr=0.3, eval_every=2, memory_format="contiguous")
    assert TrainConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert RunConfig.for_units("heads").dense.lr == 1e-4
    with pytest.raises(ValueError, match="unknown units"):
        RunConfig.for_units("neurons")


def test_commands_restore_threads_and_environment(fmnist_dir, tmp_path):
    before_threads, before_env = torch.get_num_threads(), dict(os.environ)
    assert main(["sensitivity", "--data-root", str(fmnist_dir), "--method", "l1", "--out", str(tmp_path / "s.json"),
                 "--threads", "1" if before_threads != 1 else "2", "--no-progress"]) == 0
    assert torch.get_num_threads() == before_threads and dict(os.environ) == before_env
    assert main(["models", "--threads", "1"]) == 0 and torch.get_num_threads() == before_threads
