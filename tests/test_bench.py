"""hap.bench and the deployment commands: fields, a speed-up computed from the measured medians, threads
restored; ``hap bench`` / ``hap export`` on a tiny run directory (one-line errors, exit 2)."""

from __future__ import annotations

import importlib
import json
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import hap
import hap.models as zoo
from hap.cli import main

from .cli.conftest import write_tiny_fmnist

hb = importlib.import_module("hap.bench")  # the module (``hap.bench`` itself is the function)


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 3))


def test_fields_speedup_from_medians_and_threads_restored():
    before = torch.get_num_threads()
    small, big, x = _mlp(8), _mlp(4096), torch.randn(2, 1, 8, 8)
    res = hb.bench(small, x, baseline=big, batch_sizes=(1, 16), threads=1, repeats=5, warmup=1, min_round_s=0.002)
    assert torch.get_num_threads() == before
    assert res.threads == 1 and res.batch_sizes == [1, 16] and res.repeats == 5
    for b in (1, 16):
        p, d = res.pruned[b], res.baseline[b]
        assert len(p.rounds_ms) == len(d.rounds_ms) == 5 and p.number >= 1
        assert p.median_ms == pytest.approx(statistics.median(p.rounds_ms)) and p.iqr_ms >= 0
        assert res.speedup[b] == pytest.approx(d.median_ms / p.median_ms)
        assert p.items_per_s == pytest.approx(b / (p.median_ms / 1e3))
    assert res.speedup[16] > 1  # 512x narrower hidden layer: a gap far above any load-induced noise
    assert set(res.peak_bytes) == {"pruned", "baseline"} and res.peak_bytes["baseline"] > res.peak_bytes["pruned"] > 0
    d = json.loads(res.to_json())
    assert set(d["pruned"]) == {"1", "16"} and d["speedup"]["16"] == res.speedup[16] and "torch.profiler" in \
        d["memory_method"]
    md = res.markdown()
    assert md.startswith("## Speed") and "1 thread(s)" in md and "alternating" in md and "x |" in md


def test_rounds_alternate_between_the_models(monkeypatch):
    calls = []
    real = hb.call_model
    monkeypatch.setattr(hb, "call_model", lambda m, x: (calls.append(m), real(m, x))[1])
    a, b = _mlp(4), _mlp(6)
    hb.bench(a, torch.randn(1, 1, 8, 8), baseline=b, batch_sizes=(2,), repeats=4, warmup=0, min_round_s=0.0,
             memory=False)
    timed = calls[2:]  # the first call of each model sizes its rounds
    # number=1 (min_round_s=0): a round is Timer.timeit's 2 untimed calls and the timed one
    assert timed == [m for m in (a, b, b, a, a, b, b, a) for _ in range(3)]


def test_bench_refuses_bad_settings():
    with pytest.raises(ValueError, match="repeats >= 1"):
        hb.bench(_mlp(4), torch.randn(1, 64), repeats=0)
    with pytest.raises(ValueError, match="batch sizes >= 1"):
        hb.bench(_mlp(4), torch.randn(1, 64), batch_sizes=(0,))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 'hap train'-style dense run and a 'hap prune'-style run of ResNet-20 on a tiny Fashion-MNIST."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_tiny_fmnist(root / "fmnist")
    dense = zoo.create("resnet20", num_classes=10, in_channels=1).eval()
    (root / "dense").mkdir()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(root / "dense" / "best.safetensors"))
    cfg = {"command": "train", "model": "resnet20", "data": "fashion-mnist", "data_root": str(data)}
    (root / "dense" / "config.json").write_text(json.dumps(cfg))
    x = torch.randn(4, 1, 28, 28)
    sens = hap.sensitivity(dense, F.cross_entropy, [(x, torch.arange(4))], method="l1", progress=False)
    plan = hap.plan(dense, sens, hap.Target(params=0.5), implant="pointwise", example_inputs=x[:1])
    run = root / "pruned"
    hap.save(hap.prune(dense, plan), plan, run)
    (run / "config.json").write_text(json.dumps({"model": "resnet20", "data": "fashion-mnist",
                                                 "data_options": {"data_root": str(data)}}))
    (run / "report.md").write_text("# run\n\n## Accuracy\n\ntext\n")
    (run / "manifest.json").write_text(json.dumps({"files": {"report.md": "stale"}}))
    return root


def test_cli_bench_writes_json_and_speed_section_twice(runs, capsys):
    run = runs / "pruned"
    args = ["bench", str(run), "--baseline", str(runs / "dense"), "--batch-sizes", "1", "4", "--repeats", "3"]
    assert main(args) == 0
    b = json.loads((run / "bench.json").read_text())
    assert b["threads"] == 1 and b["batch_sizes"] == [1, 4] and set(b["speedup"]) == {"1", "4"}
    assert "speed-up" not in capsys.readouterr().err
    assert main([*args[:3], str(runs / "dense" / "best.safetensors"), *args[4:]]) == 0  # a checkpoint works too
    report = (run / "report.md").read_text()
    assert report.count("## Speed") == 1 and report.startswith("# run\n\n## Accuracy\n\ntext\n\n## Speed")
    from hap.train.checkpoint import sha256_file

    files = json.loads((run / "manifest.json").read_text())["files"]
    assert files["report.md"] == sha256_file(run / "report.md") and files["bench.json"] == sha256_file(
        run / "bench.json")


def test_channels_last_and_fold_bn_are_timed_and_recorded(monkeypatch):
    model = zoo.create("resnet20", num_classes=10, in_channels=3).eval()  # C > 1: NHWC differs from NCHW
    seen = []
    real = hb.call_model

    def spy(m, x):
        seen.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                     sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())))
        return real(m, x)

    monkeypatch.setattr(hb, "call_model", spy)
    res = hb.bench(model, torch.randn(1, 3, 8, 8), baseline=model, batch_sizes=(2,), repeats=1, min_round_s=0.001,
                   memory=False, channels_last=True, fold_bn=True)
    assert seen and all(nhwc and bns == 0 for nhwc, bns in seen)
    assert sum(isinstance(b, nn.BatchNorm2d) for b in model.modules()) > 0  # the caller's model untouched
    assert res.channels_last and res.fold_bn and "channels_last (NHWC)" in res.markdown()
    again = hb.BenchResult.from_dict(json.loads(res.to_json()))
    assert again == res
    with pytest.raises(ValueError, match="not a hap bench result"):
        hb.BenchResult.from_dict({"threads": 1})


def test_cli_bench_fold_bn_channels_last(runs):
    run = runs / "pruned"
    assert main(["bench", str(run), "--batch-sizes", "2", "--repeats", "1", "--fold-bn", "--channels-last"]) == 0
    b = json.loads((run / "bench.json").read_text())
    assert b["fold_bn"] is True and b["channels_last"] is True


def test_cli_export_writes_a_checked_file(runs, tmp_path, capsys):
    out = tmp_path / "deploy" / "m.pt2"
    assert main(["export", str(runs / "pruned"), "--format", "torch.export", "--out", str(out)]) == 0
    assert out.is_file() and "match PyTorch at batch 1 and 3" in capsys.readouterr().out
    assert torch.export.load(str(out)).module()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_cli_export_heads_run(tmp_path, capsys):
    """A head-pruning run (``DIR/base`` holds the HF config and tokenizer) exports with its keyword inputs."""
    pytest.importorskip("transformers")
    from .text.conftest import make_bert, make_tokenizer

    model = make_bert()
    inputs = {"input_ids": torch.randint(5, 25, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    sens = hap.sensitivity(model, lambda o, y: F.cross_entropy(o.logits, y), [(inputs, torch.tensor([0, 1]))],
                           units="heads", method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(heads=0.5))
    run = tmp_path / "heads"
    hap.save(hap.prune(model, plan), plan, run)
    model.config.save_pretrained(run / "base")
    make_tokenizer(run / "base").save_pretrained(run / "base")
    assert main(["export", str(run), "--format", "torch.export"]) == 0
    assert (run / "model.pt2").is_file()


@pytest.mark.parametrize("args, words", [
    (["bench", "{tmp}"], "holds no plan.json"),
    (["bench", "{run}", "--baseline", "{tmp}"], "neither a run directory"),
    (["bench", "{run}", "--threads", "0"], "--threads"),
    (["export", "{tmp}", "--format", "onnx"], "holds no plan.json"),
])
def test_cli_errors_are_one_line_exit_2(runs, tmp_path, capsys, args, words):
    args = [a.format(tmp=tmp_path, run=runs / "pruned") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
