"""The causal-LM task: a tiny Llama trained by the one loop and pruned by the one pipeline, perplexity checked
against a per-text reference; the task hooks' defaults leave classifiers as they were."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers")

from hap.config import PlanConfig, SensitivityConfig  # noqa: E402
from hap.pipeline import RunConfig, run  # noqa: E402
from hap.text import load_text_data  # noqa: E402
from hap.text.lm import IGNORE_INDEX, causal_lm_loss, lm_labels  # noqa: E402
from hap.train import CausalLMTask, Task, TextTask, TrainConfig, VisionTask, train  # noqa: E402

from .._tiny_llm import make_decoder  # noqa: E402
from ..text.conftest import WORDS, make_tokenizer  # noqa: E402
from .test_loop import _Data  # noqa: E402

MAX_LEN = 12


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    tok = make_tokenizer(d / "tok")  # 25 word-level ids: within the tiny Llama's 61
    data = load_text_data(str(_write_texts(d / "t.csv", 80)),
                          fractions={"train": 0.5, "val": 0.15, "score": 0.2, "test": 0.15})
    return tok, data


def _write_texts(path, n: int):
    """Distinct texts of 1 to 12 words (so batches are padded and some are truncated at MAX_LEN tokens)."""
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    while len(rows) <= n:
        k = int(torch.randint(1, 13, (1,), generator=g))
        text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
        if f"{text},a" not in rows and f"{text},b" not in rows:
            rows.append(f"{text},{'ab'[len(rows) % 2]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _reference_ppl(model: nn.Module, tok, texts: list[str]) -> float:
    """exp(mean next-token NLL) over every text run alone (no padding, no batching): what batching must match."""
    total, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok([t], truncation=True, max_length=MAX_LEN, return_tensors="pt")["input_ids"]
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return math.exp(total / n)


def test_batches_loss_and_perplexity_match_a_per_text_reference(lm_setup):
    tok, data = lm_setup
    model = make_decoder("llama")
    task = CausalLMTask(tok, max_length=MAX_LEN, eval_batch_size=5)
    inputs, labels = next(iter(task.eval_batches(data, "test")))
    assert set(inputs) == {"input_ids", "attention_mask"}  # BERT's token_type_ids dropped: a Llama refuses them
    assert (inputs["attention_mask"] == 0).any()  # padded per batch, and the padding is not predicted
    torch.testing.assert_close(labels, lm_labels(inputs), rtol=0, atol=0)
    assert bool((labels[inputs["attention_mask"] == 0] == IGNORE_INDEX).all())
    out = model(**inputs)
    torch.testing.assert_close(task.loss(out, labels), causal_lm_loss(out, labels), rtol=0, atol=0)
    texts, _ = data.split("test")
    ref = _reference_ppl(model, tok, texts)
    assert task.metric_value(model, data, "test") == pytest.approx(ref, rel=1e-9)
    ev = task.evaluate(model, data, "test")
    assert ev["ppl"] == pytest.approx(ref, rel=1e-9) and ev["loss"] == pytest.approx(math.log(ref), rel=1e-9)
    assert 0.0 <= task.accuracy(model, data, "test") <= 1.0
    lat = task.latency_inputs(data, 3)
    assert lat["input_ids"].shape == (3, MAX_LEN) and bool((lat["attention_mask"] == 1).all())


def test_train_minimises_the_lm_loss_and_keeps_the_lowest_val_perplexity(lm_setup):
    tok, data = lm_setup
    model = make_decoder("llama")
    task = CausalLMTask(tok, max_length=MAX_LEN)
    before = task.metric_value(model, data, "val")
    res = train(model, data, TrainConfig(steps=12, lr=3e-3, batch_size=8, eval_every=4), task=task, progress=False)
    vals = [h["val_ppl"] for h in res.history]
    assert len(vals) == 3 and all("val_acc" not in h for h in res.history)
    assert res.best_val_acc == min(vals)  # lower is better: the lowest validation perplexity is kept
    assert task.metric_value(model, data, "val") == pytest.approx(min(vals), rel=1e-9)
    assert min(vals) < before


def test_pipeline_prunes_a_llama_with_repair_and_fine_tune(lm_setup):
    tok, data = lm_setup
    model = make_decoder("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = CausalLMTask(tok, max_length=MAX_LEN)
    cfg = RunConfig.for_units(
        "heads,neurons", target={"params": 0.2}, repair="lsq", repair_batches=2, max_length=MAX_LEN,
        sensitivity=SensitivityConfig(units="heads,neurons", method="hap-fisher", max_samples=8, max_batches=2),
        sens_batch_size=8, plan=PlanConfig(implant=None, allocation="global", rank_by="score_per_param", tol=0.08),
        finetune=TrainConfig(steps=4, lr=1e-3, batch_size=8, eval_every=2, warmup=0.0), dense=None,
        latency_batch=2, latency_rounds=1, latency_repeats=1)
    small, plan, sens, m = run(model, task, data, cfg, progress=False)
    for k in ("dense_test_ppl", "test_ppl_surgery", "val_ppl_surgery", "test_ppl_oneshot", "val_ppl_oneshot",
              "val_ppl", "test_ppl"):
        assert math.isfinite(m[k]) and m[k] > 1.0, k
    assert not any(k.endswith("_acc") or "_acc_" in k for k in m)  # a perplexity is never reported as accuracy
    assert m["finetune_steps"] == 4 and [h["step"] for h in m["finetune_history"]] == [2, 4]
    assert m["val_ppl"] == pytest.approx(min(h["val_ppl"] for h in m["finetune_history"]), rel=1e-9)
    assert m["test_ppl"] == pytest.approx(task.metric_value(small, data, "test"), rel=1e-9)
    assert m["dense_test_ppl"] == pytest.approx(task.metric_value(model, data, "test"), rel=1e-9)
    assert m["repair_layers"] > 0 and m["repair_rel_err_after"] <= m["repair_rel_err_before"] + 1e-12
    assert 0.1 < m["params_removed"] < 0.3 and m["heads"] < m["heads_base"]
    assert m["latency_batch"] == [2, MAX_LEN] and sens.settings["split"] == "score"
    for k, v in model.state_dict().items():  # the model given is not modified
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_tokenizer_without_pad_token_is_refused(lm_setup):
    tok, _ = lm_setup

    class NoPad:
        pad_token = None

    with pytest.raises(ValueError, match="pad_token = tokenizer.eos_token"):
        CausalLMTask(NoPad())
    assert CausalLMTask(tok).name == "causal-lm"


# ---------------------------------------------------------------------- classifiers: the defaults unchanged


def test_default_hooks_are_the_classifier_loss_accuracy_and_selection():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    for task in (Task(), VisionTask(), TextTask(tokenizer=None)):
        assert (task.metric, task.higher_is_better) == ("acc", True)
        torch.testing.assert_close(task.loss(logits, y), F.cross_entropy(logits, y), rtol=0, atol=0)
        assert task.batch_stats(logits, y) == (7, int((logits.argmax(-1) == y).sum()))
        assert task.better(0.5, None) and task.better(0.6, 0.5) and not task.better(0.5, 0.5)
    lm = CausalLMTask(tokenizer=None)
    assert lm.better(3.0, 4.0) and not lm.better(4.0, 3.0) and lm.better(9.0, None)


class _Images(_Data):
    in_channels = 1
    image_size = (8, 8)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def test_the_loop_trains_on_the_task_loss_and_a_vision_run_is_unchanged():
    class Spy(VisionTask):
        calls = 0

        def loss(self, outputs, targets):
            Spy.calls += 1
            return super().loss(outputs, targets)

    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=16, augment=False, memory_format="contiguous")
    a, b = _cnn(), _cnn()
    ra = train(a, _Images(), cfg, task=VisionTask(eval_batch_size=16), progress=False)
    rb = train(b, _Images(), cfg, task=Spy(eval_batch_size=16), progress=False)
    assert Spy.calls == 4  # one call per step: the loop's loss is the task's
    assert ra.history == [{**rb.history[0], "seconds": ra.history[0]["seconds"]}]
    assert ra.best_val_acc == ra.history[0]["val_acc"]
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_distillation_averages_per_predicted_token_for_a_causal_lm_and_per_example_for_a_classifier():
    """A classifier's distillation is the KL of its rows, as it always was; a causal LM's is the mean KL over
    exactly the tokens its next-token loss predicts (padding and the last position excluded), computed here
    position by position."""
    from hap.text.lm import IGNORE_INDEX
    from hap.train import CausalLMTask, VisionTask
    from hap.train.tasks import kl_per_row

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randn(2, 5, 7, generator=g,
                                                                               dtype=torch.float64)
    a, b = s[:, 0], t[:, 0]  # a classifier's (batch, classes)
    ref = F.kl_div(F.log_softmax(a / 2, -1), F.softmax(b / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(VisionTask().kd_loss(a, b, torch.zeros(2), 2.0), ref, rtol=0, atol=0)
    labels = torch.tensor([[3, 1, 4, 1, 5], [2, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])  # row 2 padded
    predicted = [(i, j) for i in range(2) for j in range(4) if labels[i, j + 1] != IGNORE_INDEX]  # logits j -> j+1
    assert len(predicted) == 5
    per_token = torch.stack([kl_per_row(s[i, j][None], t[i, j][None], 2.0) for i, j in predicted])
    got = CausalLMTask(tokenizer=None).kd_loss(s, t, labels, 2.0)
    torch.testing.assert_close(got, per_token.mean(), rtol=1e-12, atol=0)
    none = torch.full_like(labels, IGNORE_INDEX)
    assert float(CausalLMTask(tokenizer=None).kd_loss(s, t, none, 2.0)) == 0.0


