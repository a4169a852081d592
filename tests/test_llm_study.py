"""benchmarks/llm_study.py's document helpers: which seed directories are pooled, and the paired cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ._bench import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("llm_study")


def test_seed_directories_are_the_base_and_its_numbered_siblings(study, tmp_path):
    base = tmp_path / "llm_study"
    for name in ("llm_study", "llm_study_s1", "llm_study_s10", "llm_study_s2", "llm_study_smoke", "llm_study_sx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "study.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "llm_study_s3").mkdir()  # no study.json: nothing was run there
    got = [d.name for d in study.seed_dirs(base, base)]
    assert got == ["llm_study", "llm_study_s1", "llm_study_s2", "llm_study_s10"]
    other = tmp_path / "llm_study_smoke"
    assert study.seed_dirs(other, base) == [other]  # a directory outside the family is pooled alone


def test_cells_pair_each_seed_with_its_own_dense_model(study):
    """Two seeds whose dense perplexities differ by 10: the change is per seed (+2 and +4, mean +3 with standard
    error 1), not the spread of the raw values."""
    assert study.with_delta([102.0, 114.0], [100.0, 110.0]) == "108.00 (+3.00 ± 1.00)"
    assert study.with_delta([0.80], [0.85], scale=100) == "80.00 (-5.00)"
    assert study.mean_se([1.0, 3.0]) == f"2.00 ± {np.std([1.0, 3.0], ddof=1) / np.sqrt(2):.2f}"


def test_the_unit_choice_follows_the_measured_wins(study):
    both = study.choice_text({"ppl_oneshot": (4, 4, 7.0), "ppl_repair": (4, 4, 1.0)})
    assert "Prune slots for quality" in both
    mixed = study.choice_text({"ppl_oneshot": (2, 4, -15.0), "ppl_repair": (4, 4, 0.7)})
    assert "no consistent winner" in mixed and "after repair slots are ahead in every pair" in mixed
    groups = study.choice_text({"ppl_oneshot": (0, 4, -5.0), "ppl_repair": (0, 4, -1.0)})
    assert "groups better" in groups and "Prune slots" not in groups and "ahead in every pair" not in groups
