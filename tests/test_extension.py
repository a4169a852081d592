"""A new criterion and a new unit family, defined here (no library file edited), registered and run through
sensitivity -> plan -> prune -> save/load: the extension points work as the README says."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.units import ROLE_IN, ROLE_OUT, ParamSlice, Unit, unregister_family


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class HiddenNeurons:
    """Toy family: hidden neurons of every ``fc1 -> fc2`` pair (row of fc1, column of fc2)."""

    name = "toy-neurons"
    kind = "toy-neuron"

    def discover(self, model: nn.Module, example_inputs: Any, exclude: Sequence[str] = ()) -> list[Unit]:
        n = model.fc1.out_features
        return [
            Unit("fc1", i, (ParamSlice("fc1.weight", 0, (i,), ROLE_OUT), ParamSlice("fc1.bias", 0, (i,), ROLE_OUT),
                            ParamSlice("fc2.weight", 1, (i,), ROLE_IN)), kind=self.kind)
            for i in range(n)
        ]

    def apply(self, model: nn.Module, removed: Mapping[str, Sequence[int]], example_inputs: Any) -> None:
        gone = set(removed.get("fc1", ()))
        keep = torch.tensor([i for i in range(model.fc1.out_features) if i not in gone])
        with torch.no_grad():
            model.fc1.weight = nn.Parameter(model.fc1.weight[keep].clone())
            model.fc1.bias = nn.Parameter(model.fc1.bias[keep].clone())
            model.fc2.weight = nn.Parameter(model.fc2.weight[:, keep].clone())
        model.fc1.out_features = model.fc2.in_features = len(keep)

    def estimation_context(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(model)


def _index_score(ctx: hap.criteria.ScoreContext) -> np.ndarray:
    """Toy criterion: later units are more important (so the plan's choice is known in advance)."""
    return np.array([float(u.index) for u in ctx.units])


@pytest.fixture
def registered():
    fam = hap.register_family(HiddenNeurons())
    crit = hap.register_criterion("toy-index", _index_score, needs_data=False, description="unit index")
    yield fam, crit
    unregister_family(fam.name)
    hap.criteria.REGISTRY.unregister(crit.name)


def test_toy_criterion_and_family_run_end_to_end(registered, tmp_path):
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    assert "toy-index" in hap.criteria.names("toy-neuron")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], units="toy-neurons", method="toy-index", progress=False)
    assert sens.method == "toy-index" and len(sens.units) == 10 and {u.unit.kind for u in sens.units} == {"toy-neuron"}
    plan = hap.plan(model, sens, hap.Target(params=0.3), implant=None)
    (g,) = plan.groups
    assert g.kind == "toy-neuron" and g.removed == list(range(len(g.removed))) and len(g.removed) > 0
    assert abs(plan.params_removed - 0.3) <= 0.05
    small = hap.prune(model, plan)
    assert small.fc1.out_features == 10 - len(g.removed)
    masked = TwoLayer().eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked.fc2.weight[:, g.removed] = 0
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)
    hap.save(small, plan, tmp_path / "run")
    again = hap.load(tmp_path / "run", TwoLayer())
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))


def test_plan_with_an_unregistered_kind_is_an_error():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    fam = hap.register_family(HiddenNeurons())
    try:
        sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], units="toy-neurons", method="l1", progress=False)
        plan = hap.plan(model, sens, hap.Target(params=0.3), implant=None)
    finally:
        unregister_family(fam.name)
    with pytest.raises(ValueError, match="no unit family handles units of kind 'toy-neuron'"):
        hap.prune(model, plan)
    with pytest.raises(ValueError, match="no unit family"):
        hap.plan(model, sens, hap.Target(params=0.3), implant=None)


def test_criterion_refuses_unit_kinds_it_does_not_support():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="'michel' scores head units, not 'channel' units"):
        hap.sensitivity(model, F.cross_entropy, [(x, y)], method="michel", progress=False)
