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
