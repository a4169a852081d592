"""benchmarks/vision_study.py helpers: the reproducing command, the results block, the kept-width table."""

from __future__ import annotations

import argparse
import json

import pytest

from ._bench import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("vision_study")


def _args(study, **kw):
    a = argparse.Namespace(**study.DEFAULTS)
    a.__dict__.update(kw)
    return a


def test_command_names_only_the_options_that_change_the_numbers(study):
    assert study._command(_args(study)) == "python benchmarks/vision_study.py"
    long = _args(study, name="vision_study_ft3", ft_epochs=3, ft_steps=None)
    want = "python benchmarks/vision_study.py --name vision_study_ft3 --ft-epochs 3 --ft-steps 0"
    assert study._command(long) == want


def _run(method, alloc, seed, acc, widths=None, target=0.7):
    key = "dense-control" if method == "dense-control" else f"{method}_{alloc}_p{int(target * 100)}"
    r = dict(key=key, method=method, alloc=alloc, target=None if method == "dense-control" else target, seed=seed,
             test_acc=acc, test_acc_oneshot=None if method == "dense-control" else acc - 0.5, params_removed=0.7,
             macs_removed=0.6, speedup=1.5, total_s=60.0)
    if widths:
        r["widths"] = widths
    return r


def test_results_block_means_spread_and_widths(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "STUDY", tmp_path / "runs")
    monkeypatch.setattr(study, "DOCS", tmp_path / "results.md")
    (tmp_path / "runs").mkdir()
    (tmp_path / "results.md").write_text("# Results\n\nhand-written findings stay\n")
    w = {"conv1": [9, 0, 7], "layer3.0.shortcut.0": [34, 0, 30], "layer1.0.conv1": [4, 0, 12]}
    runs = [_run("dense-control", None, 0, 0.936), _run("dense-control", None, 1, 0.938),
            _run("hap", "uniform", 0, 0.92, w), _run("hap", "uniform", 1, 0.91, w)]
    for i, r in enumerate(runs):
        (tmp_path / "runs" / f"{i}.json").write_text(json.dumps(r))
    study.write_results(_args(study), {"epochs": 15, "best_val_acc": 0.94}, 0.9364)
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Results\n\nhand-written findings stay\n")
    assert text.count("<!-- vision-study -->") == 2
    assert "| hap | uniform | 70.00 ± 0.00 | 60.00 ± 0.00 | 41.50 ± 0.71 | 91.50 ± 0.71 | -2.20 | 1.50x | 2 |" in text
    assert "| stem/L1 stream | L3.0 stream | L1.0 |" in text and "| hap | uniform | 9/16 | 34/64 | 4/16 |" in text


def test_grid_runs_only_the_requested_rows_in_priority_order(study):
    g = study.run_grid([0.7, 0.5], [0, 1], ["hap", "l1"], ["uniform"])
    assert {m for m, *_ in g} == {"dense-control", "hap", "l1"}  # no Torch-Pruning rows unless asked for
    assert g[:3] == [("dense-control", None, None, 0), ("hap", 0.7, "uniform", 0), ("l1", 0.7, "uniform", 0)]
    assert sum(m == "dense-control" for m, *_ in g) == 2  # one control per seed, shared by the targets
    tp = study.run_grid([0.7], [0], ["hap", "tp-magnitude"], ["uniform"])
    assert ("tp-magnitude", 0.7, "global", 0) in tp
