"""One layer as a least-squares problem: unfolded inputs, float64 normal equations, damped solve."""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import all_reduce_sum, world_size

__all__ = ["unfold_inputs", "unfold_patches"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHUNK_BYTES = 32 * 2**20  # bound on the per-example products (B x d x d) formed at a time
_ROWS = 4096  # rows of a linear layer's inputs multiplied at a time (float32 products stay accurate)


def _spatial(conv: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Kernel, dilation, stride of a Conv1d/Conv2d as 2-d tuples (a Conv1d is a 1 x k Conv2d)."""
    if isinstance(conv, nn.Conv1d):
        return (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
    return tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.stride)


def _unfold_cols(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches ``(N, C_in * prod(kernel), output positions)`` of a Conv1d/Conv2d's input ``x``."""
    if isinstance(module, nn.Conv3d):
        raise NotImplementedError("repair does not unfold 3-d convolutions yet: leave the layer out with layers=[...]")
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        raise NotImplementedError(f"cannot unfold the inputs of a {type(module).__name__}")
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        pad = list(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode) if any(pad) else x
        padding: tuple[int, ...] = (0, 0)
    else:
        padding = (0, module.padding[0]) if isinstance(module, nn.Conv1d) else tuple(module.padding)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
    kernel, dilation, stride = _spatial(module)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def unfold_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches ``(N, C_in * prod(kernel), output positions)`` of a Conv1d/Conv2d's input (im2col),
    column order as in ``weight.reshape(out, -1)``: what the per-example gradients of the Fisher hooks
    are made of."""
    return _unfold_cols(module, x)


def unfold_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows ``X`` such that ``module(x)`` equals ``X @ W.T`` (+ bias) row for row.

    For an ``nn.Linear``: ``x`` flattened to ``(-1, in_features)``. For a ``Conv1d``/``Conv2d``: the
    unfolded patches, ``(N * output positions, C_in * prod(kernel))``, column order as in
    ``weight.reshape(out, -1)`` (channel-major), row order as ``output.movedim(1, -1).reshape(-1, out)``;
    stride, padding (including ``"same"`` and non-zero padding modes) and dilation are honoured. This is
    what the layer Hessian ``H = XᵀX`` of :func:`obs_costs` is made of.

    Raises:
        NotImplementedError: A ``Conv3d`` (or another layer type).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = _unfold_cols(module, x)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _output_rows(y: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``(rows, channels)`` view of a layer's output, rows ordered as :func:`unfold_inputs`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _weight_t(module: nn.Module) -> torch.Tensor:
    """Current weights as ``(groups, d_in (+1 bias), out/groups)`` float64."""
    g = getattr(module, "groups", 1)
    w = module.weight.detach().to(torch.float64)
    o = w.shape[0]
    wt = w.reshape(g, o // g, -1).transpose(1, 2)
    if module.bias is not None:
        wt = torch.cat([wt, module.bias.detach().to(torch.float64).reshape(g, 1, o // g)], 1)
    return wt


def _write_weight_t(module: nn.Module, wt: torch.Tensor) -> None:
    w = module.weight
    o = w.shape[0]
    d = w[0].numel()
    with torch.no_grad():
        w.copy_(wt[:, :d, :].transpose(1, 2).reshape(w.shape).to(w.dtype))
        if module.bias is not None:
            module.bias.copy_(wt[:, d, :].reshape(o).to(module.bias.dtype))


class _Problem:
    """Normal equations of one layer (one block per conv group), accumulated over batches."""

    def __init__(self, name: str, module: nn.Module, rows: torch.Tensor | None, device: torch.device) -> None:
        self.name = name
        self.module = module
        self.rows = rows
        self.groups = int(getattr(module, "groups", 1))
        self.bias = module.bias is not None
        self.d = module.weight[0].numel()  # per-group input columns
        self.out = module.weight.shape[0]
        self.o = self.out // self.groups
        k = self.d + int(self.bias)
        self.G = torch.zeros(self.groups, k, k, dtype=torch.float64, device=device)
        self.C = torch.zeros(self.groups, k, self.o, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.n = 0
        self.seconds = 0.0
        self._final = False

    def add(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one batch: ``x`` what the layer receives, ``y`` the original layer's output (all channels).

        Products are formed in the layer's precision (float64 layers: float64; anything else: float32),
        per example for convs (sums over its output positions) or per block of at most ``_ROWS`` rows
        for linear layers, and summed into the float64 normal equations.
        """
        if self._final:
            raise RuntimeError(f"layer '{self.name}': batches added after its normal equations were finalised")
        t0 = time.perf_counter()
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.rows is not None:
            y = y.index_select(y.dim() - 1 if isinstance(self.module, nn.Linear) else 1, self.rows.to(y.device))
        if y.shape[-1 if isinstance(self.module, nn.Linear) else 1] != self.out:
            raise ValueError(
                f"layer '{self.name}' has {self.out} outputs but the original's outputs have shape "
                f"{tuple(y.shape)}: small and original must be the same architecture (small = hap.prune(original))"
            )
        g, d, o = self.groups, self.d, self.o
        if isinstance(self.module, nn.Linear):
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                keep = mask.to(x.device) != 0
                x, y = x[keep], y[keep]
            xr, yr = x.reshape(-1, d), y.reshape(-1, o)
            if xr.shape[0] != yr.shape[0]:
                raise ValueError(
                    f"layer '{self.name}': {xr.shape[0]} input rows but {yr.shape[0]} output rows in the original: "
                    "small and original must be the same architecture (small = hap.prune(original, plan))"
                )
            for i in range(0, xr.shape[0], _ROWS):
                xc, yc = xr[i : i + _ROWS].to(cdt), yr[i : i + _ROWS].to(cdt)
                self._accumulate(xc.T[None, None], yc[None, None], xc.shape[0])
        else:
            n = x.shape[0]
            positions = y[0, 0].numel() if y.dim() > 2 and y.shape[0] == n else -1
            # examples per step: the unfolded patches and the per-example products stay under _CHUNK_BYTES
            per_example = g * d * max(1, positions) * 4 + g * (d * d + d * o) * 8
            step = max(1, _CHUNK_BYTES // per_example)
            for i in range(0, n, step):
                cols = _unfold_cols(self.module, x[i : i + step])  # (B, g*d, L)
                if y.shape[0] != n or cols.shape[2] != positions:
                    raise ValueError(
                        f"layer '{self.name}': its inputs give {cols.shape[2]} output positions per example but "
                        f"the original's outputs have shape {tuple(y.shape)}: small and original must be the same "
                        "architecture (small = hap.prune(original, plan))"
                    )
                xc = cols.view(cols.shape[0], g, d, positions).to(cdt)
                yc = y[i : i + step].reshape(-1, g, o, positions).to(cdt).transpose(-1, -2)
                self._accumulate(xc, yc, xc.shape[0] * positions)
        self.seconds += time.perf_counter() - t0

    def _accumulate(self, xc: torch.Tensor, yc: torch.Tensor, rows: int) -> None:
        """``xc``: (B, g, d, L) inputs, ``yc``: (B, g, L, o) targets; sums over B and L into G, C."""
        d = self.d
        gxx = torch.matmul(xc, xc.transpose(-1, -2)).sum(0).to(torch.float64)  # (g, d, d)
        cxy = torch.matmul(xc, yc).sum(0).to(torch.float64)  # (g, d, o)
        yy = float(yc.to(torch.float64).pow(2).sum())
        if not bool(torch.isfinite(gxx).all()):
            raise ValueError(
                f"the inputs of layer '{self.name}' in the pruned model contain NaN or inf: check the calibration "
                "batches and the pruned model's weights"
            )
        if not (bool(torch.isfinite(cxy).all()) and math.isfinite(yy)):
            raise ValueError(
                f"the outputs of layer '{self.name}' in the original model contain NaN or inf: check the "
                "calibration batches and the original model's weights"
            )
        self.G[:, :d, :d] += gxx
        self.C[:, :d, :] += cxy
        if self.bias:
            sx = xc.sum((0, 3), dtype=torch.float64)  # (g, d)
            self.G[:, :d, d] += sx
            self.G[:, d, :d] += sx
            self.G[:, d, d] += rows
            self.C[:, d, :] += yc.sum((0, 2), dtype=torch.float64)
        self.yy += yy
        self.n += rows

    def finalize(self) -> None:
        """Under ``torch.distributed``: add every rank's normal equations (``XᵀX``, ``XᵀY``, ``ΣY²``, rows)
        into this one, once, so every rank solves the same problem over the union of the shards. Every
        rank must call it for the same layers in the same order; a no-op for one process."""
        if self._final:
            return
        self._final = True
        if world_size() > 1:
            self.G = all_reduce_sum(self.G)
            self.C = all_reduce_sum(self.C)
            self.yy = all_reduce_sum(float(self.yy))
            self.n = all_reduce_sum(int(self.n))

    def error(self, wt: torch.Tensor) -> float:
        """``tr(WᵀGW) - 2 tr(WᵀC) + ΣY²`` summed over groups."""
        return float((wt * torch.bmm(self.G, wt)).sum() - 2 * (wt * self.C).sum()) + self.yy

    def solve(self, damping: float) -> torch.Tensor:
        diag = self.G.diagonal(dim1=1, dim2=2)
        scale = diag[:, : self.d].mean(1).clamp_min(1e-12)
        a = self.G + (damping * scale)[:, None, None] * torch.eye(self.G.shape[1], dtype=self.G.dtype,
                                                                    device=self.G.device)
        chol, info = torch.linalg.cholesky_ex(a)
        if bool((info == 0).all()):
            return torch.cholesky_solve(self.C, chol)
        return torch.linalg.pinv(a, hermitian=True) @ self.C  # singular (dead inputs, no damping)
