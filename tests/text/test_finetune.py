"""The text fine-tune loop: a budget in steps, linear schedule, best-on-validation weights restored."""

from __future__ import annotations

import pytest

from hap.text import TextTrainConfig, evaluate_text, load_text_data, load_text_model, train_text

from .conftest import save_model_dir, write_csv


@pytest.fixture
def setup(tmp_path):
    data = load_text_data(str(write_csv(tmp_path / "d.csv", n=120)),
                          fractions={"train": 0.6, "val": 0.2, "score": 0.0, "test": 0.2})
    tm = load_text_model(save_model_dir(tmp_path / "enc", classifier=False), data.label_names)
    return tm, data


def test_learns_an_easy_task_and_keeps_the_best_val_weights(setup):
    tm, data = setup
    before = evaluate_text(tm.model, tm.tokenizer, data, "val")
    cfg = TextTrainConfig(steps=60, lr=3e-3, batch_size=12, eval_every=20, seed=0)
    res = train_text(tm.model, tm.tokenizer, data, cfg)
    assert res.steps == 60 and [h["step"] for h in res.history] == [20, 40, 60]
    assert not tm.model.training
    after = evaluate_text(tm.model, tm.tokenizer, data, "val")
    assert after == res.best_val_acc == max(h["val_acc"] for h in res.history)
    assert after >= 0.75 > before  # one sentiment word decides the label: a tiny BERT learns it


def test_step_budget_and_epochs(setup):
    tm, data = setup
    assert TextTrainConfig(epochs=2, batch_size=10).total_steps(72) == 16
    res = train_text(tm.model, tm.tokenizer, data, TextTrainConfig(steps=9, batch_size=32, lr=1e-4))
    assert res.steps == 9 and res.best_step is None  # 9 steps span several passes over 72 texts
