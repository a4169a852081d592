"""Every zoo model goes through the library pipeline: one train step, scores, a 50% params plan, surgery."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hap
import hap.models


@pytest.mark.parametrize("name", hap.models.list_models())
def test_zoo_model_trains_and_prunes_to_half(name):
    torch.manual_seed(0)
    model = hap.models.create(name, num_classes=10, in_channels=1)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(params=0.5), implant=None, example_inputs=x[:1])
    small = hap.prune(model, plan)
    assert abs(plan.params_removed - 0.5) <= 0.01
    assert hap.count_params(small) == plan.achieved["params"]
    out = small.eval()(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()

