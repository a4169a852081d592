"""``hap.pipeline.run`` on a tiny CNN: the metrics the reports read, the repair hook, no global state changed."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from hap.config import PlanConfig, SensitivityConfig
from hap.pipeline import RunConfig, run
from hap.train import TrainConfig, VisionTask

from .train.test_loop import _Data


class _Images(_Data):
    in_channels = 1
    image_size = (8, 8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


CFG = RunConfig(target={"channels": 0.5}, sensitivity=SensitivityConfig(method="l1", max_batches=1),
                plan=PlanConfig(implant=None), finetune=TrainConfig(epochs=1, lr=0.01, batch_size=16, augment=False,
                                                                    memory_format="contiguous"),
                bn_batches=2, latency_batch=2, latency_rounds=1, latency_repeats=1, sens_batch_size=16, repair=None)


def test_run_measures_what_the_reports_read_and_restores_global_state():
    # torch itself sets TORCHINDUCTOR_CACHE_DIR when its first optimiser is built: not hap's doing
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    threads, env = torch.get_num_threads(), dict(os.environ)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, plan, sens, m = run(model, VisionTask(eval_batch_size=16), _Images(), CFG, progress=False)
    assert torch.get_num_threads() == threads and dict(os.environ) == env
    for k in ("test_acc_oneshot", "val_acc_oneshot", "test_acc", "val_acc", "dense_test_acc", "params",
              "params_base", "macs", "macs_base", "speedup", "latency_ms", "latency_ms_base", "finetune_steps"):
        assert k in m, k
    assert m["params"] < m["params_base"] and m["finetune_steps"] == 4 and sens.method == "l1"
    assert RunConfig.from_dict(m["config"]) == CFG
    for k, v in model.state_dict().items():  # the model given is not modified
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_repair_stage_refits_and_reports_before_and_after():
    model = _model()
    cfg = CFG.replace(repair="lsq", repair_batches=2, finetune=CFG.finetune.replace(epochs=0))
    small, plan, _, m = run(model, VisionTask(eval_batch_size=16), _Images(), cfg, progress=False)
    for k in ("test_acc_surgery", "val_acc_surgery", "test_acc_oneshot", "repair_s", "repair_peak_mb",
              "repair_examples"):
        assert k in m, k
    assert m["repair"] == "lsq" and m["finetune_steps"] == 0 and m["repair_layers"] > 0
    assert m["repair_examples"] > 0
    assert m["repair_rel_err_after"] <= m["repair_rel_err_before"] + 1e-12


def test_unknown_repair_is_an_error():
    with pytest.raises(ValueError, match="repair must be one of lsq"):
        run(_model(), VisionTask(eval_batch_size=16), _Images(), CFG.replace(repair="magic"), progress=False)


def test_unknown_target_kind_is_an_error():
    with pytest.raises(ValueError):
        run(_model(), VisionTask(eval_batch_size=16), _Images(), CFG.replace(target={"layers": 0.5}), progress=False)


# ------------------------------------------------------------------------------------------------ --device


def test_device_cpu_and_auto_resolve_to_the_cpu_without_a_gpu(monkeypatch):
    from hap.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert RunConfig().device == "auto" and RunConfig(device="cpu").problems() == []


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_an_unavailable_gpu_is_a_one_line_error_naming_the_fix(monkeypatch, spec):
    from hap.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device needs a CUDA GPU and torch finds none here: use cpu"):
        RunConfig(device=spec).validate()
    with pytest.raises(ValueError, match="use cpu"):
        resolve_device(spec)
    with pytest.raises(ValueError, match="needs a CUDA GPU") as e:  # before any compute: the model is never run
        run(_model(), VisionTask(eval_batch_size=16), None, CFG.replace(device=spec), progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", 0])
def test_a_malformed_device_names_the_choices(spec):
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        RunConfig(device=spec).validate()


def test_a_gpu_index_this_machine_lacks_is_an_error(monkeypatch):
    from hap.pipeline import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") is None
    assert "it has 2" in device_problem("cuda:2") and "cuda:0..cuda:1" in device_problem("cuda:2")


def test_device_cpu_run_equals_the_default_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" is the CPU even on a GPU machine
    cfg = CFG.replace(finetune=CFG.finetune.replace(epochs=None, steps=2))
    a_small, a_plan, a_sens, a = run(_model(), VisionTask(eval_batch_size=16), _Images(), cfg, progress=False)
    b_small, b_plan, b_sens, b = run(_model(), VisionTask(eval_batch_size=16), _Images(), cfg.replace(device="cpu"),
                                     progress=False)
    assert a["device"] == b["device"] == "cpu"
    assert a_plan.to_dict() == b_plan.to_dict()
    for k in ("dense_test_acc", "test_acc_oneshot", "val_acc_oneshot", "test_acc", "val_acc", "params", "macs"):
        assert a[k] == b[k], k
    sa, sb = a_small.state_dict(), b_small.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].device.type == "cpu"
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_on_device_moves_every_batch_the_stages_draw(monkeypatch):
    """Without a GPU: the ``meta`` device stands in for it (tensors that carry a device and no data)."""
    import hap.train.tasks as tasks
    from hap.pipeline import on_device

    data, meta = _Images(), torch.device("meta")
    task = VisionTask(eval_batch_size=16)
    moved = on_device(task, meta)
    assert isinstance(moved, VisionTask) and on_device(task, torch.device("cpu")) is task
    cfg = task.resolve(CFG.finetune)
    for batches in (moved.eval_batches(data, "val"), moved.train_batches(data, cfg, 0),
                    moved.sensitivity_batches(data, 16, 1, 0)):
        x, y = next(iter(batches))
        assert x.device == meta and y.device == meta
    x, _ = next(iter(task.eval_batches(data, "val")))  # the task given is unchanged
    assert x.device.type == "cpu"
    seen = []
    monkeypatch.setattr(tasks, "recalibrate_bn", lambda model, batches, max_batches: seen.append(next(iter(batches))))
    moved.after_surgery(_model(), data, 1, 0)
    assert seen and seen[0][0].device == meta
