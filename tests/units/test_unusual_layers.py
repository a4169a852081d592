"""Issue 15 items 7-9: GroupNorm, recurrent layers and tied parameters in channel groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.units import UnsupportedLayerError


class _GN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gn2 = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.gn(self.c1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.gn2(self.c2(h))), 1).flatten(1))


def _gn_model() -> nn.Module:
    torch.manual_seed(0)
    m = _GN()
    with torch.no_grad():
        for norm in (m.gn, m.gn2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return m.eval()


def test_groupnorm_units_are_whole_groups_and_match_the_masked_model():
    m = _gn_model()
    x = torch.randn(4, 3, 8, 8)
    groups = {g.name: g for g in hap.channel_groups(m, x)}
    assert groups["c1"].size == 4 and groups["c2"].size == 3  # one unit per GroupNorm group
    assert groups["c1"].units[1].slices[0].indices == (2, 3)
    removed = {"c1": [1, 3], "c2": [0]}
    small = copy.deepcopy(m)
    hap.units.channels.remove_channels(small, removed, x)
    assert (small.gn.num_groups, small.gn.num_channels) == (2, 4)  # fewer groups, each as large as before
    assert (small.gn2.num_groups, small.gn2.num_channels) == (2, 4)
    masked = copy.deepcopy(m)
    with torch.no_grad():  # zero what the removed units produce: every other group is normalised as before
        for name, norm, units, size in (("c1", masked.gn, removed["c1"], 2), ("c2", masked.gn2, removed["c2"], 2)):
            ch = [u * size + j for u in units for j in range(size)]
            conv = getattr(masked, name)
            conv.weight[ch] = 0
            conv.bias[ch] = 0
            norm.weight[ch] = 0
            norm.bias[ch] = 0
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_groupnorm_plan_and_prune_end_to_end():
    m = _gn_model()
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 4, (4,))
    sens = hap.sensitivity(m, F.cross_entropy, [(x, y)], method="l1")
    plan = hap.plan(m, sens, hap.Target(params=0.3), example_inputs=x, tol=0.2, round_to=1)
    small = hap.prune(m, plan)
    assert small.gn.num_channels % small.gn.num_groups == 0 and small.gn.num_channels // small.gn.num_groups == 2
    assert small(x).shape == (4, 4)


class _RNN(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.rnn = kind(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        o, _ = self.rnn(self.b(F.relu(self.a(x))))
        return self.fc(o[:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layer_is_refused_naming_the_exclusion_that_works(kind):
    m, x = _RNN(kind), torch.randn(2, 5, 6)
    for exclude in (None, ["rnn"]):
        with pytest.raises(UnsupportedLayerError, match=r"recurrent.*exclude=\['b'\]"):
            hap.channel_groups(m, x, exclude=exclude)
    assert [g.name for g in hap.channel_groups(m, x, exclude=["b"])] == ["a"]  # the exclusion named works


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.c.weight = self.b.weight  # one tensor, two users
        self.d = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))))


def test_tied_parameters_are_refused_saying_tied_and_the_exclusion_works():
    m, x = _Tied(), torch.randn(2, 6)
    with pytest.raises(UnsupportedLayerError, match=r"tied.*b\.weight, c\.weight.*exclude=\['c', 'b', 'a'\]"):
        hap.channel_groups(m, x)
    with pytest.raises(UnsupportedLayerError, match="tied"):
        hap.sensitivity(m, F.cross_entropy, [(x, torch.tensor([0, 1]))], method="l1")
    assert [g.name for g in hap.channel_groups(m, x, exclude=["c", "b", "a"])] == ["d"]
