"""Shared by the latency-table and planner tests: a tiny conv net, a quick measured table, and a synthetic
table whose times are the layers' MACs (deterministic, so plans test arithmetic, not timing noise)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
import hap.latency_table as lt
from hap.planning.latency import LatencyTable, LayerLatency


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def tiny():
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(4, 3, 8, 8)
    sens = hap.sensitivity(model, F.cross_entropy, [(x, torch.arange(4))], method="l1", progress=False)
    return model, x, sens


def quick(model, x, **kw):
    return lt.measure_table(model, x[:1], batch_size=2, repeats=2, min_round_s=0.0005, shares=(0.5, 1.0), **kw)


def synthetic_for(model, x) -> LatencyTable:
    """A table for ``model`` whose times are its MACs (deterministic): the planner's arithmetic, not noise."""
    layers, counts = {}, {}
    for m, ins, outs in lt._layer_shapes(model, x[:1]).values():
        k = lt.layer_key(m, ins)
        counts[k] = counts.get(k, 0) + 1
        full_in, full_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels,
                                                                                            m.out_channels)
        kk = 1 if isinstance(m, nn.Linear) else math.prod(m.kernel_size)
        pos = 1 if isinstance(m, nn.Linear) else math.prod(outs[1:])
        ws_in, ws_out = sorted({1, full_in // 2, full_in}), sorted({1, full_out // 2, full_out})
        layers[k] = LayerLatency(ws_in, ws_out, [[1e-4 * i * o * kk * pos for o in ws_out] for i in ws_in],
                                 full_in, full_out, positions=pos, weights_per_pair=kk)
    return LatencyTable(meta={"batch": 1}, layers=layers, counts=counts, dense_ms=1.0, rest_ms=0.05)
