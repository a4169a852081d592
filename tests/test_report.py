"""The report writer draws on its own Agg canvases: importing it or plotting changes no global backend;
a regenerated report.md keeps the Speed section of the run's bench.json."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import hap.report


def test_import_and_plot_keep_matplotlib_backend(tmp_path):
    code = (
        "import matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import hap.report\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "plan = {'method': 'l1', 'allocation': 'uniform', 'target': {'params': 0.5},\n"
        "        'groups': [{'name': 'conv1', 'kept': [0], 'implanted': [], 'removed': [1]}]}\n"
        f"p = hap.report.plot_widths(plan, __import__('pathlib').Path({str(tmp_path)!r}) / 'w.png')\n"
        "assert p.stat().st_size > 0 and matplotlib.get_backend() == before\n"
        "print(before)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "svg"


def _metrics() -> dict:
    return {"params_base": 100, "params": 50, "params_removed": 0.5, "macs_base": 1000, "macs": 400,
            "macs_removed": 0.6, "test_acc_oneshot": 0.5, "latency_ms_base": 2.0, "latency_ms": 1.0, "speedup": 2.0,
            "config": {"method": "l1", "target": {"params": 0.5}, "allocation": "uniform", "implant": None}}


def test_regenerated_report_keeps_the_speed_section(tmp_path):
    hb = importlib.import_module("hap.bench")
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    assert "## Speed" not in hap.report.write_run_report(tmp_path).read_text()  # no bench.json: no section
    small, big = nn.Linear(8, 2), nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 2))
    res = hb.bench(small, torch.randn(1, 8), baseline=big, batch_sizes=(1, 4), repeats=2, min_round_s=0.001,
                   memory=False)
    (tmp_path / "bench.json").write_text(json.dumps(res.to_dict() | {"run": str(tmp_path), "baseline_path": "x"}))
    for _ in range(2):  # regenerating twice gives one section, the measured one
        text = hap.report.write_run_report(tmp_path).read_text()
        assert text.count("## Speed") == 1 and res.markdown().strip() in text
        assert f"{res.speedup[4]:.2f}x" in text
    (tmp_path / "bench.json").write_text("{not json")
    text = hap.report.write_run_report(tmp_path).read_text()
    assert "bench.json could not be read" in text and "rerun 'hap bench'" in text


def _lm_metrics(run: str, ppl: float, sha: str = "ab12") -> dict:
    m = {k: v for k, v in _metrics().items() if not k.startswith("test_acc")}
    return m | {"dense_test_ppl": 10.0, "test_ppl_oneshot": ppl * 2, "val_ppl": ppl + 1, "test_ppl": ppl,
                "test_size": 512, "test_labels_sha": sha, "val_size": 256}


def test_comparison_of_causal_lm_runs_shows_perplexities_and_refuses_mixed_tasks(tmp_path):
    runs = []
    for name, ppl in (("a", 12.5), ("b", 17.25)):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(_lm_metrics(name, ppl)))
        runs.append(d)
    text = hap.report.write_comparison(runs, tmp_path / "cmp").read_text()
    assert "test perplexity (lower is better)" in text and "top-1" not in text
    assert "| 12.500 |" in text and "| 17.250 |" in text and "| 25.000 |" in text  # test and one-shot, unscaled
    assert "512 test tokens" in text and (tmp_path / "cmp" / "accuracy_vs_params.png").is_file()
    c = tmp_path / "classifier"
    c.mkdir()
    (c / "metrics.json").write_text(json.dumps(_metrics() | {"test_acc": 0.5, "val_acc": 0.5}))
    with pytest.raises(ValueError, match="compare runs of the same task"):
        hap.report.write_comparison([*runs, c], tmp_path / "cmp2")
    assert hap.report.metric_of(_lm_metrics("a", 1.0)) == "ppl" and hap.report.metric_of(_metrics()) == "acc"
