"""The compensation-aware criteria against brute force: drop a unit's consumer columns, refit the consumer
by (damped) least squares on the same inputs, measure how much its reconstruction error grew."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.criteria.obs import DAMPING, consumer_columns
from hap.repair.lsq import unfold_inputs


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _brute(model: Chain, x: torch.Tensor, layer: str, cols: list[int]) -> float:
    """Error increase of ``layer``'s damped least-squares fit when ``cols`` are dropped (weights refit)."""
    mod = dict(model.named_modules())[layer]
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(unfold_inputs(m, a[0]).double()))
    with torch.no_grad():
        model(x)
    h.remove()
    X = seen[0]
    W = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
    G = X.T @ X
    lam = DAMPING * float(G.diagonal().mean())
    keep = [c for c in range(X.shape[1]) if c not in set(cols)]
    # refit the kept columns to reproduce the layer's own output X Wᵀ: min ||X (W' - W)ᵀ||² + lam ||W' - W||²
    # (the damped objective repair solves), with W' zero on the dropped columns
    Xk = X[:, keep]
    rhs = Xk.T @ (X @ W.T) + lam * W[:, keep].T
    Wk = torch.linalg.solve(Xk.T @ Xk + lam * torch.eye(len(keep), dtype=X.dtype), rhs).T
    Wn = torch.zeros_like(W)
    Wn[:, keep] = Wk
    D = Wn - W
    return float(((X @ D.T) ** 2).sum() + lam * (D**2).sum())


def test_obs_score_equals_brute_force_refit():
    torch.manual_seed(0)
    model = Chain().eval()
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 2, (6,))
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="obs", progress=False)
    units = [u.unit for u in sens.units]
    cols = consumer_columns(model, units)
    for pos, _u in enumerate(units):
        want = sum(_brute(model, x, layer, sorted(by[pos])) for layer, by in cols.items() if pos in by)
        np.testing.assert_allclose(sens.units[pos].score, want, rtol=1e-6, atol=1e-9)


def test_greedy_first_removal_is_the_cheapest_single_cost():
    torch.manual_seed(1)
    model = Chain().eval()
    x, y = torch.randn(6, 2, 6, 6), torch.randint(0, 2, (6,))
    single = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="obs", progress=False)
    greedy = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="obs-greedy", progress=False)
    for g, us in single.by_group().items():
        s = np.array([u.score for u in us])
        gs = np.array([u.score for u in greedy.by_group()[g]])
        assert int(np.argmin(gs)) == int(np.argmin(s))
        np.testing.assert_allclose(gs.min(), s.min(), rtol=1e-9)
        assert np.all(np.diff(np.sort(gs)) >= 0) and len(set(gs)) == len(gs)  # a strict removal order
