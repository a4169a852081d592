"""The structured OBS cost on a layer Hessian ``H = XᵀX``: what a layer's reconstruction error grows by when
a group of its input columns goes *and the remaining columns compensate* (optimal least squares):
``cost_G = tr(W_G [(H⁻¹)_GG]⁻¹ W_Gᵀ)``; and the greedy variant that removes one group at a time, updating
``H⁻¹`` and ``W`` after each removal. Pure tensor functions, no model code."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["channel_column_groups", "obs_costs", "greedy_obs_select"]


def channel_column_groups(in_channels: int, kernel_numel: int = 1) -> list[list[int]]:
    """Column groups of input channels in :func:`unfold_inputs` order: channel ``c`` owns columns
    ``c*kernel_numel ... (c+1)*kernel_numel - 1`` (for a Linear, ``kernel_numel=1``)."""
    return [list(range(c * kernel_numel, (c + 1) * kernel_numel)) for c in range(in_channels)]


def _check_hw(H: torch.Tensor, W: torch.Tensor, groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if W.dim() != 2 or W.shape[1] != H.shape[0]:
        raise ValueError(f"W must be (out, {H.shape[0]}) to match H, got shape {tuple(W.shape)}")
    idx = []
    for i, g in enumerate(groups):
        t = torch.as_tensor(list(g), dtype=torch.long, device=H.device)
        if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= H.shape[0]:
            raise ValueError(f"group {i} must be non-empty column indices in 0..{H.shape[0] - 1}")
        idx.append(t)
    return idx


def spd_inverse(H: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("H is not positive definite: damp it (add a multiple of the identity) first")
    return torch.cholesky_inverse(chol)


def group_cost(hinv: torch.Tensor, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    m = hinv.index_select(0, idx).index_select(1, idx)
    wg = W.index_select(1, idx)  # (out, |G|)
    z = torch.linalg.solve(m, wg.T)  # [(H⁻¹)_GG]⁻¹ W_Gᵀ
    return (wg.T * z).sum()


def obs_costs(H: torch.Tensor, W: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Structured OBS cost of removing each group of input columns of one layer, the rest compensating.

    ``cost_G = tr(W_{:,G} [(H⁻¹)_GG]⁻¹ W_{:,G}ᵀ)``: with ``H = XᵀX`` (the layer's inputs on calibration
    data, damped), the increase of ``||XWᵀ - X'W'ᵀ||²`` when columns ``G`` are dropped and the remaining
    weights are refit by least squares. For a conv, a channel's group is its ``k*k`` unfolded columns
    (:func:`channel_column_groups`).

    Args:
        H: ``(d, d)`` symmetric positive definite (float64 recommended).
        W: ``(out, d)`` weights (a conv's ``weight.reshape(out, -1)``).
        groups: Column-index groups.

    Returns:
        ``(len(groups),)`` costs, in ``H``'s dtype.
    """
    idx = _check_hw(H, W, groups)
    W = W.to(H.dtype)
    hinv = spd_inverse(H)
    return torch.stack([group_cost(hinv, W, i) for i in idx]) if idx else H.new_zeros(0)


def greedy_obs_select(
    H: torch.Tensor, W: torch.Tensor, groups: Sequence[Sequence[int]], n_remove: int, *, return_weight: bool = False
) -> tuple[list[int], list[float]] | tuple[list[int], list[float], torch.Tensor]:
    """Remove ``n_remove`` groups one at a time, each time the one whose OBS cost is lowest.

    After each removal ``W`` gets the OBS update ``W -= W_{:,G} [(H⁻¹)_GG]⁻¹ (H⁻¹)_{G,:}`` (the remaining
    columns compensate; ``W_{:,G}`` becomes 0) and ``H⁻¹`` becomes the inverse of ``H`` restricted to the
    remaining columns (``H⁻¹ -= (H⁻¹)_{:,G} [(H⁻¹)_GG]⁻¹ (H⁻¹)_{G,:}``), so each cost is the increase of the
    reconstruction error given the groups already removed, and their sum is the error of the final set.

    Args:
        H, W, groups: As :func:`obs_costs`; groups must be disjoint.
        n_remove: How many groups to remove (``0..len(groups)``).
        return_weight: Also return the compensated ``W`` (removed columns zero).

    Returns:
        ``(order, costs)``: group indices in removal order and the cost of each step (and ``W``).
    """
    idx = _check_hw(H, W, groups)
    if not 0 <= n_remove <= len(idx):
        raise ValueError(f"n_remove must be in 0..{len(idx)}, got {n_remove}")
    flat = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    if flat.numel() != flat.unique().numel():
        raise ValueError("groups overlap: every column may belong to one group at most")
    W = W.to(H.dtype).clone()
    hinv = spd_inverse(H)
    remaining = list(range(len(idx)))
    order: list[int] = []
    costs: list[float] = []
    for _ in range(n_remove):
        c = torch.stack([group_cost(hinv, W, idx[i]) for i in remaining])
        k = int(torch.argmin(c))
        gi = remaining.pop(k)
        g = idx[gi]
        m_inv = torch.linalg.inv(hinv.index_select(0, g).index_select(1, g))
        rows = hinv.index_select(0, g)  # (|G|, d)
        W -= (W.index_select(1, g) @ m_inv) @ rows
        hinv = hinv - rows.T @ m_inv @ rows
        W[:, g] = 0
        hinv[g, :] = 0
        hinv[:, g] = 0
        order.append(gi)
        costs.append(float(c[k]))
    if return_weight:
        return order, costs, W
    return order, costs
