"""The one loop with the text task: a budget in steps, linear schedule, best-on-validation weights restored."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hap.text import load_text_data, load_text_model  # noqa: E402
from hap.train import TextTask, TrainConfig, train  # noqa: E402

from ..text.conftest import save_model_dir, write_csv  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    data = load_text_data(str(write_csv(tmp_path / "d.csv", n=120)),
                          fractions={"train": 0.6, "val": 0.2, "score": 0.0, "test": 0.2})
    tm = load_text_model(save_model_dir(tmp_path / "enc", classifier=False), data.label_names)
    return tm, data


def test_learns_an_easy_task_and_keeps_the_best_val_weights(setup):
    tm, data = setup
    task = TextTask(tm.tokenizer)
    before = task.accuracy(tm.model, data, "val")
    cfg = TrainConfig(steps=60, lr=3e-3, batch_size=12, eval_every=20, seed=0)
    res = train(tm.model, data, cfg, task=task, progress=False)
    assert res.steps == 60 and [h["step"] for h in res.history] == [20, 40, 60]
    assert not tm.model.training
    after = task.accuracy(tm.model, data, "val")
    assert after == res.best_val_acc == max(h["val_acc"] for h in res.history)
    assert after >= 0.75 > before  # one sentiment word decides the label: a tiny BERT learns it


def test_step_budget_and_epochs(setup):
    tm, data = setup
    task = TextTask(tm.tokenizer)
    assert data.sizes()["train"] == 72
    assert task.total_steps(data, task.resolve(TrainConfig(epochs=2, batch_size=10))) == 16
    res = train(tm.model, data, TrainConfig(steps=9, batch_size=32, lr=1e-4), task=task, progress=False)
    assert res.steps == 9 and res.best_step is None  # 9 steps span several passes over 72 texts


def test_text_defaults_fill_only_unset_fields(setup):
    tm, _ = setup
    cfg = TextTask(tm.tokenizer).resolve(TrainConfig(lr=1e-3))
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.schedule, cfg.warmup, cfg.grad_clip) == (
        1e-3, 32, 0.01, "linear", 0.06, 1.0)
