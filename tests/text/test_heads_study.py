"""benchmarks/heads_study.py helpers: its own marked block of docs/results.md, run order, the table."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from .._bench import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("heads_study")


def test_only_its_own_block_is_replaced(study, tmp_path):
    doc = tmp_path / "results.md"
    other = "<!-- vision-study -->\n# vision\n| a | b |\n<!-- vision-study -->\n"
    doc.write_text("# Results\n\n" + other)
    study.replace_marked_block(doc, "first", study.MARKER)
    text = doc.read_text()
    assert text.startswith("# Results\n\n" + other)
    assert text.endswith("<!-- heads-study -->\nfirst\n<!-- heads-study -->\n")
    study.replace_marked_block(doc, "second\nbody", study.MARKER)
    again = doc.read_text()
    assert other in again and "first" not in again and again.count("<!-- heads-study -->") == 2
    assert again == text.replace("first", "second\nbody")
    new = tmp_path / "new.md"
    study.replace_marked_block(new, "x", study.MARKER)
    assert new.read_text() == "<!-- heads-study -->\nx\n<!-- heads-study -->\n"
    assert new.stat().st_mode & 0o777 == 0o644 and not list(tmp_path.glob(".*"))


def test_priority_order(study):
    g = study.grid([0, 1], [0.2, 0.6, 0.4], ["hap", "random"])
    assert g[:4] == [("control", None, 0), ("hap", 0.6, 0), ("random", 0.6, 0), ("hap", 0.4, 0)]
    assert g[7] == ("control", None, 1) and len(g) == 14
    assert study.run_name("hap", 0.6, 1) == "hap_h60_s1" and study.run_name("control", None, 0) == "control_s0"


def test_table_means_and_standard_errors(study, tmp_path):
    (tmp_path / "runs").mkdir()
    base = dict(heads_base=72, heads=29, heads_removed=43 / 72, params_removed=0.093, speedup=1.2, sens_wall_s=10.0,
                sens_samples=128, target=0.6, heads_per_layer={"l0": 12, "l1": 17})
    runs = {"control_s0": dict(method="control", target=None, seed=0, test_acc=0.86),
            "control_s1": dict(method="control", target=None, seed=1, test_acc=0.88),
            "hap_h60_s0": dict(base, method="hap", seed=0, test_acc_oneshot=0.70, test_acc=0.85, sens_split_half=0.5),
            "hap_h60_s1": dict(base, method="hap", seed=1, test_acc_oneshot=0.72, test_acc=0.87, sens_split_half=0.3)}
    for name, r in runs.items():
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(r))
    args = argparse.Namespace(smoke=False, dense_epochs=1.0, dense_lr=1e-4, ft_steps=60, ft_batch=16, ft_lr=5e-5,
                              max_samples=128, max_length=64)
    data = SimpleNamespace(sizes=lambda: {"train": 4000, "val": 500, "score": 512, "test": 1000})
    table = study.results_table(tmp_path, args, {"test_acc": 0.857, "params": 22713986}, data)
    assert "| dense control (+60 steps) | 0 | 0 | - | 87.0 ± 1.0 | 0 | 1.00x | - | 12 each | 2 |" in table
    row = ("| HAP (Hessian trace) | 43 of 72 (60) | 9.3 ± 0.0 | 71.0 ± 1.0 | 86.0 ± 1.0 | -1.0 | 1.20x "
           "| 0.40 ± 0.10 | 12/17 | 2 |")
    assert row in table
    assert "binomial standard error of about 1.1 points (1000 texts)" in table
