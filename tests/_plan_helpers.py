"""Shared pieces of the plan / surgery / implant / io tests: small nets, scores, and the masked oracle."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.planning import GroupPlan


class ImplantNet(nn.Module):
    """Every structure an implant's channel permutation must survive: BN, concat, flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = (1, 6, 6)
        self.stem = nn.Conv2d(1, 5, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(5)
        self.a = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(5, 5, 3, padding=1, stride=2)  # bias, no BN, strided
        self.c = nn.Conv2d(11, 6, 3, padding=1)
        self.c_bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        a = F.relu(self.a_bn(self.a(x)))
        b = F.relu(self.b(x))
        x = torch.cat([F.max_pool2d(a, 2), b], 1)
        x = F.relu(self.c_bn(self.c(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (a fresh zoo model's BN is the identity, hiding mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                fan = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def example(model: nn.Module, n: int = 2, side: int = 8, seed: int = 0) -> torch.Tensor:
    shape = getattr(model, "input_shape", None)
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    if shape is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
        shape = (first.in_features,) if isinstance(first, nn.Linear) else (first.in_channels, side, side)
    return torch.randn(n, *shape, generator=gen).to(dtype)


def scores(model: nn.Module, x: torch.Tensor, method: str = "random", seed: int = 0) -> hap.Sensitivity:
    """Cheap per-unit scores (random or L1) over the model's channel groups."""
    out = model(x)
    y = torch.zeros(len(x), dtype=torch.long) % out.shape[1]
    return hap.sensitivity(model, F.cross_entropy, [(x, y)], method=method, seed=seed, progress=False)


def masked(model: nn.Module, sens: hap.Sensitivity, groups: list[GroupPlan], zero_implanted: bool) -> nn.Module:
    """The oracle: a copy with every slice of every removed unit zeroed (BN weight and bias included).

    In eval mode a BatchNorm entry with zero weight and bias outputs 0, so a removed channel contributes
    nothing downstream: the masked model computes what the physically pruned one must. With
    ``zero_implanted`` the root filters of implanted channels are zeroed too (a zero-initialised pointwise
    implant contributes only the bias, like a zeroed filter).
    """
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    units = {(u.group, u.index): u.unit for u in sens.units}
    with torch.no_grad():
        for g in groups:
            for c in g.removed:
                for s in units[(g.name, c)].slices:
                    params[s.param].index_fill_(s.dim, torch.tensor(s.indices), 0.0)
            if zero_implanted:
                for c in g.implanted:
                    params[f"{g.name}.weight"][c].zero_()
    return m
