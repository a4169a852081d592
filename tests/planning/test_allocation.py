"""hap.planning.allocation: the candidate order keeps one unit of every producer a group spans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.models.tiny import TinyConcatDepthwise
from hap.planning.allocation import GroupInfo, candidates


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_producer_of_a_shared_group_is_never_emptied(allocation):
    """Units 0-3 come from one producer, 4-7 from another (a concat): however their scores rank, no step
    removes all four of either, and each producer's most important unit is the one that stays."""
    units = [("g", i) for i in range(8)]
    scores = np.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0])  # producer A is the least important throughout
    info = GroupInfo(kind="channel", keep_one_of=[frozenset(range(4)), frozenset(range(4, 8))])
    cands, _ = candidates(units, scores, {"g": info}, allocation=allocation, max_layer_ratio=0.95)
    g = cands.groups[0]
    assert g.cap == 6
    removable = g.order[: g.cap]
    assert set(removable) == {0, 1, 2, 4, 5, 6}  # 3 and 7 (each producer's highest score) stay
    assert removable[:3] == [0, 1, 2]  # otherwise the order of the scores


def test_without_producers_the_group_rule_alone():
    units = [("g", i) for i in range(4)]
    cands, _ = candidates(units, np.arange(4.0), {"g": GroupInfo(kind="channel")}, allocation="global",
                          max_layer_ratio=1.0)
    assert cands.groups[0].cap == 3 and cands.groups[0].order == [0, 1, 2, 3]


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_concat_branches_keep_a_channel_at_every_target(allocation):
    """TinyConcatDepthwise: its two branches are concatenated into one depthwise group; a plan at any target
    (once emptied a branch, a conv with 0 outputs) leaves each branch a channel and a model that runs."""
    torch.manual_seed(0)
    model = TinyConcatDepthwise().eval()
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8) % 3
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l1", progress=False)
    done = 0
    for t in np.arange(0.1, 0.91, 0.05):
        try:
            plan = hap.plan(model, sens, hap.Target(params=float(t)), allocation=allocation, implant=None, tol=0.1)
        except hap.PlanError as e:
            assert "cannot be met" in str(e)
            continue
        small = hap.prune(model, plan)
        widths = _out_channels(small)
        assert widths["branch_a"] >= 1 and widths["branch_b"] >= 1, (t, widths)
        assert widths["depthwise"] == widths["branch_a"] + widths["branch_b"]
        assert small(x).shape == (8, 3)
        done += 1
    assert done >= 8  # most targets were planned, the large ones among them
