"""The ``hap`` CLI: real files out, one-line errors and a non-zero exit code on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hap
from hap.cli import main


def test_sensitivity_writes_json_and_table(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "sens.json"
    rc = main(["sensitivity", "--data-root", str(fmnist_dir), "--out", str(out), "--max-samples", "8",
               "--min-samples", "4", "--batches", "2", "--batch-size", "16", "--no-progress"])
    assert rc == 0
    sens = hap.Sensitivity.load(out)
    assert sens.method == "hap" and sens.samples == 8 and len(sens.units) > 100
    text = capsys.readouterr().out
    assert "split-half" in text and "layer1.0.conv1" in text
    assert json.loads(out.read_text())["settings"]["model"] == "resnet20"


def test_train_then_baseline_sensitivity_from_checkpoint(fmnist_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(fmnist_dir), "--epochs", "1", "--batch-size", "32", "--out", str(run),
                 "--no-progress"]) == 0
    assert {"best.safetensors", "last.json", "metrics.json", "config.json"} <= {p.name for p in run.iterdir()}
    # a second train into the same directory is refused, --resume continues it
    assert main(["train", "--data-root", str(fmnist_dir), "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    assert main(["train", "--data-root", str(fmnist_dir), "--epochs", "1", "--batch-size", "32", "--out", str(run),
                 "--resume", "--no-progress"]) == 0
    out = tmp_path / "l1.json"
    assert main(["sensitivity", "--data-root", str(fmnist_dir), "--checkpoint", str(run / "best.safetensors"),
                 "--method", "l1", "--out", str(out), "--no-progress"]) == 0
    assert hap.Sensitivity.load(out).method == "l1"


@pytest.mark.parametrize(
    "args, words",
    [
        (["sensitivity", "--model", "nope"], "unknown model"),
        (["sensitivity", "--method", "magic"], "unknown method"),
        (["sensitivity", "--max-samples", "0"], "--max-samples 0: must be"),
        (["sensitivity", "--checkpoint", "missing.safetensors"], "no weights file"),
        (["sensitivity", "--data", "/nonexistent/folder"], ""),
    ],
)
def test_bad_input_exits_2_with_one_line(fmnist_dir, tmp_path, args, words):
    cmd = [sys.executable, "-m", "hap.cli", *args, "--data-root", str(fmnist_dir), "--out", str(tmp_path / "o.json"),
           "--no-progress"]
    if args[-1] == "/nonexistent/folder":
        cmd.remove("--data-root")
        cmd.remove(str(fmnist_dir))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr and words in err[0]
    assert not (tmp_path / "o.json").exists()


def test_wrong_checkpoint_architecture(fmnist_dir, tmp_path):
    import torch.nn as nn

    from hap.train import save_weights

    ck = save_weights(nn.Linear(3, 2), tmp_path / "other.safetensors")
    assert main(["sensitivity", "--data-root", str(fmnist_dir), "--checkpoint", str(ck), "--out",
                 str(tmp_path / "o.json"), "--no-progress"]) == 2


def test_prune_pipeline_writes_every_file_and_reloads(fmnist_dir, tmp_path):
    run = tmp_path / "dense"
    assert main(["train", "--data-root", str(fmnist_dir), "--epochs", "1", "--batch-size", "32", "--out", str(run),
                 "--no-progress"]) == 0
    ck = str(run / "best.safetensors")
    pr = tmp_path / "hap"
    assert main(["prune", "--data-root", str(fmnist_dir), "--checkpoint", ck, "--method", "hap", "--max-samples", "8",
                 "--target", "params=0.5", "--implant", "pointwise", "--finetune-epochs", "1", "--out", str(pr),
                 "--no-progress"]) == 0
    files = {p.name for p in pr.iterdir()}
    assert {"config.json", "sensitivity.json", "plan.json", "model.safetensors", "metrics.json", "report.md",
            "sensitivity.png", "widths.png"} <= files
    m = json.loads((pr / "metrics.json").read_text())
    assert abs(m["params_removed"] - 0.5) <= 0.01
    # the saved run reloads and evaluates, a second baseline run compares against it
    assert main(["eval", "--data-root", str(fmnist_dir), "--run", str(pr)]) == 0
    l1 = tmp_path / "l1"
    assert main(["prune", "--data-root", str(fmnist_dir), "--checkpoint", ck, "--method", "l1", "--allocation",
                 "global", "--target", "params=0.5", "--finetune-epochs", "0", "--out", str(l1), "--no-progress"]) == 0
    assert main(["report", str(pr), str(l1), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "accuracy_vs_params.png").is_file()
    cmp = (tmp_path / "cmp" / "report.md").read_text()
    assert "hap/uniform+pointwise" in cmp and "l1/global" in cmp  # uniform is the default allocation
    # an existing run is not overwritten without being asked
    assert main(["prune", "--data-root", str(fmnist_dir), "--checkpoint", ck, "--out", str(pr), "--no-progress"]) == 2
    assert main(["finetune", "--data-root", str(fmnist_dir), "--run", str(pr), "--epochs", "1", "--no-progress"]) == 0


@pytest.mark.parametrize("target", ["params=1.5", "params=0", "bogus=0.5", "params=abc"])
def test_prune_rejects_bad_targets(fmnist_dir, tmp_path, target):
    assert main(["prune", "--data-root", str(fmnist_dir), "--target", target, "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "r").exists()


def test_post_training_mode_repairs_without_fine_tuning(fmnist_dir, tmp_path):
    """``--repair lsq --calibration N --finetune-epochs 0``: accuracy before and after the repair, its cost."""
    out = tmp_path / "pt"
    assert main(["prune", "--data-root", str(fmnist_dir), "--method", "l1", "--target", "params=0.5", "--repair", "lsq",
                 "--calibration", "64", "--sens-batch-size", "32", "--finetune-epochs", "0", "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["repair"] == "lsq" and m["repair_examples"] == 64 and m["finetune_steps"] == 0
    assert m["test_acc"] == m["test_acc_oneshot"] and "test_acc_surgery" in m and m["repair_s"] > 0
    assert "after repair" in (out / "report.md").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["repair"] == "lsq" and cfg["repair_batches"] == 2 and cfg["sens_batch_size"] == 32  # all applied
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses an unknown repair with its usage line
        main(["prune", "--data-root", str(fmnist_dir), "--repair", "magic", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2


def test_demo_runs_both_steps_with_its_defaults(monkeypatch, tmp_path):
    """``hap demo`` drives ``hap train`` then ``hap prune`` through their real parsers (both stubbed here:
    the real demo takes minutes); every namespace the steps read must be complete, ``--threads`` included."""
    import hap.cli.prune as prune_cli
    import hap.cli.vision as vision_cli

    seen = {}
    monkeypatch.setattr(vision_cli, "cmd_train", lambda a: seen.setdefault("train", a) and 0)
    monkeypatch.setattr(prune_cli, "cmd_prune", lambda a: seen.setdefault("prune", a) and 0)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--threads", "1", "--no-progress"]) == 0
    t, p = seen["train"], seen["prune"]
    assert t.threads == 1 and p.threads == 1 and t.epochs == 3 and t.subset == 12000
    assert p.target == "params=0.7" and getattr(p, "plan.round_to") == 8 and p.checkpoint.endswith("best.safetensors")
    assert p.out == str(tmp_path / "demo" / "params70")


def test_fisher_backend_and_device_options_reach_the_run_config():
    import hap.estimate.fisher
    from hap.cli import build_parser
    from hap.cli.prune import resolve
    from hap.config import FISHER_BACKENDS

    assert FISHER_BACKENDS == hap.estimate.fisher.FISHER_BACKENDS  # the CLI's choices are the sampler's
    args = build_parser().parse_args(["prune", "--fisher-backend", "hooks", "--device", "cpu", "--out", "x"])
    cfg = resolve(args)
    assert cfg.sensitivity.fisher_backend == "hooks" and cfg.device == "cpu"
    default = resolve(build_parser().parse_args(["prune", "--out", "x"]))
    assert default.sensitivity.fisher_backend == "auto" and default.device == "auto"
    for cmd in (["prune", "--out", "x"], ["sensitivity"]):
        with pytest.raises(SystemExit) as exit_info:  # argparse: the choices are the config's
            build_parser().parse_args([*cmd, "--fisher-backend", "magic"])
        assert exit_info.value.code == 2


def test_sensitivity_fisher_backend_reaches_the_estimate(fmnist_dir, tmp_path):
    out = tmp_path / "sens.json"
    assert main(["sensitivity", "--data-root", str(fmnist_dir), "--out", str(out), "--max-samples", "8",
                 "--min-samples", "4", "--batches", "1", "--batch-size", "8", "--curvature", "fisher",
                 "--fisher-backend", "vmap", "--no-progress"]) == 0
    assert json.loads(out.read_text())["settings"]["fisher_backend_used"] == "vmap"


def test_prune_on_a_gpu_this_machine_lacks_exits_2_naming_the_fix(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r"
    assert main(["prune", "--device", "cuda", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hap prune: error: --device 'cuda': needs a CUDA GPU and torch finds none here: use cpu (or auto)"]
    assert not out.exists()  # refused before the run directory is touched


def test_train_and_finetune_take_the_same_device_rule(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--device", "cuda:0", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert main(["finetune", "--device", "gpu", "--run", str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hap train: error: --device 'cuda:0': needs a CUDA GPU and torch finds none here: use cpu (or auto)",
                   "hap finetune: error: --device 'gpu': must be auto, cpu, cuda or cuda:N"]
    assert not (tmp_path / "t").exists()


def test_prune_table_and_report_name_the_latency_batch_the_run_used(fmnist_dir, tmp_path, capsys):
    """``RunConfig.latency_batch`` (here from a ``--config`` file) is the batch both tables name, not 64."""
    from hap.pipeline import RunConfig

    cfg = RunConfig.for_units("channels", latency_batch=3, latency_rounds=1, latency_repeats=1, bn_batches=1,
                              repair=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "r"
    assert main(["prune", "--config", str(tmp_path / "config.json"), "--data-root", str(fmnist_dir), "--method", "l1",
                 "--target", "params=0.5", "--finetune-epochs", "0", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["latency_batch"] == [3]
    table = capsys.readouterr().out
    assert "CPU latency b3 (ms)" in table and "b64" not in table
    report = (out / "report.md").read_text()
    assert "| CPU latency, batch 3, 1 thread (ms) |" in report and "batch 64" not in report


@pytest.mark.parametrize("cmd, args, line", [
    ("train", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("train", ["--lr", "nan"], "--lr nan: must be > 0"),
    ("train", ["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    ("train", ["--epochs", "-1", "--lr", "0"], "--epochs -1.0: must be >= 0; --lr 0.0: must be > 0"),
    ("finetune", ["--lr", "-0.5"], "--lr -0.5: must be > 0"),
])
def test_train_and_finetune_errors_name_the_flag(tmp_path, capsys, cmd, args, line):
    """The rule is TrainConfig's, the words the command line's: the flag and its value on one line, exit 2,
    before the data is read (``--data`` names no dataset here) or the run directory is touched."""
    where = ["--out", str(tmp_path / "t")] if cmd == "train" else ["--run", str(tmp_path / "t")]
    assert main([cmd, *args, *where, "--data", str(tmp_path / "no-such-data"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hap {cmd}: error: {line}"]
    assert not (tmp_path / "t").exists()


def _text_classifier_run(tmp_path: Path) -> Path:
    """A small ``hap heads`` run (tiny random BERT-style classifier, 40 texts, 2 fine-tune steps)."""
    pytest.importorskip("transformers")
    from ..text.conftest import save_model_dir, write_csv

    model_dir = save_model_dir(tmp_path / "clf", num_labels=2)
    out = tmp_path / "run"
    assert main(["heads", "--model", str(model_dir), "--data", str(write_csv(tmp_path / "d.csv", n=40)), "--method",
                 "l1", "--target", "heads=0.25", "--finetune-steps", "2", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    return out


def test_eval_and_finetune_of_a_text_classifier_run(tmp_path, capsys):
    """``hap eval --run`` / ``hap finetune`` on a ``hap heads`` run: its own model and data (accuracy), not a
    zoo CNN on Fashion-MNIST."""
    out = _text_classifier_run(tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["acc"] == m["test_acc"] and got["n"] == m["test_size"] and got["params"] == m["params"]
    assert main(["finetune", "--run", str(out), "--epochs", "1", "--no-progress", "--threads", "1"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["extra_finetune"][-1]["lr"] == m["config"]["finetune"]["lr"]  # the run's own settings
    assert m2["finetune_steps"] > m["finetune_steps"] and m2["test_labels_sha"] == m["test_labels_sha"]
    assert main(["eval", "--run", str(out), "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == m2["test_acc"]
    assert f"after {m2['finetune_steps']} fine-tune steps" in (out / "report.md").read_text()


def test_finetune_writes_the_run_only_through_rank_0(tmp_path, monkeypatch):
    """Under torchrun every rank runs ``hap finetune`` on the same run directory: its files must be replaced by
    rank 0 alone (``hap.distributed.on_main``), so a rank that is not rank 0 leaves every file as it was."""
    import hap.distributed

    out = _text_classifier_run(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(hap.distributed, "on_main", lambda fn: None)  # a rank other than 0
    assert main(["finetune", "--run", str(out), "--epochs", "1", "--no-progress", "--threads", "1"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    assert main(["finetune", "--run", str(out), "--epochs", "1", "--no-progress", "--threads", "1"]) == 0
    assert (out / "metrics.json").read_bytes() != before["metrics.json"]  # rank 0 (or one process) writes
