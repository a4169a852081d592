"""Neural Implant: a cheap stand-in for the moderately sensitive channels of a k x k convolution.

Of the channels a plan would remove, the most sensitive fraction is *implanted* instead: their output
is produced by something much cheaper than their k x k filters, so the layer keeps part of their
signal. Two implants:

``pointwise`` (the HAP paper's)
    A 1 x 1 convolution over the same inputs (same stride), ``C_in * n`` weights instead of
    ``C_in * n * k * k``. **Zero-initialised**, as the reference: without data there is no estimate
    of the k x k response a 1 x 1 filter could match, and any guess can be worse than zero, while zero
    makes the freshly pruned model exactly the original with those filters zeroed (the BatchNorm that
    follows still adds its shift), a known starting point that fine-tuning improves. With data,
    :func:`calibrate` replaces the zeros by the least-squares fit of the original channels' outputs.

``lowrank`` (ours)
    A rank-``r`` factorisation: a k x k convolution to ``r`` channels, then a 1 x 1 convolution to the
    ``n`` implanted channels, initialised from the truncated SVD of the original filters of those
    channels (reshaped to ``n x C_in*k*k``), so it starts at the best rank-``r`` approximation of the
    original function (exact at full rank). ``r`` is the largest rank whose parameters stay within a
    set fraction of what the implanted filters had; where even rank 1 is too expensive (few implanted
    channels) the pointwise implant is used instead.

Run-time layout: :class:`ImplantedConv` computes ``cat([kept(x), implant(x)], 1)``: two convolutions
and one concatenation. The surgery permutes the group's channels once (BatchNorm entries and every
consumer's input columns) so that kept channels come first and implanted ones last; nothing scatters
into a zero tensor at run time (:class:`ScatterImplantedConv` is that naive layout, kept for the speed
benchmark and as a test oracle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import call_model, eval_mode
from .config import IMPLANT_KINDS

__all__ = [
    "IMPLANT_KINDS",
    "ImplantedConv",
    "ScatterImplantedConv",
    "implant_unsupported_reason",
    "implant_block_reason",
    "lowrank_rank",
    "implant_params",
    "pointwise_implant",
    "lowrank_implant",
    "implanted_conv",
    "calibrate",
]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ImplantedConv(nn.Module):
    """A convolution split into its kept filters and an implant: ``cat([kept(x), implant(x)], dim=1)``.

    Attributes:
        kept: The original convolution restricted to the kept output channels.
        implant: Produces the implanted channels from the same input (a 1 x 1 conv, or a k x k conv to
            ``rank`` channels followed by a 1 x 1 conv).
    """

    def __init__(self, kept: nn.Module, implant: nn.Module) -> None:
        super().__init__()
        self.kept = kept
        self.implant = implant

    @property
    def in_channels(self) -> int:
        return int(self.kept.in_channels)

    @property
    def n_kept(self) -> int:
        return int(self.kept.out_channels)

    @property
    def n_implanted(self) -> int:
        last = self.implant[-1] if isinstance(self.implant, nn.Sequential) else self.implant
        return int(last.out_channels)

    @property
    def out_channels(self) -> int:
        return self.n_kept + self.n_implanted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.kept(x), self.implant(x)], dim=1)

    def extra_repr(self) -> str:
        return f"kept={self.n_kept}, implanted={self.n_implanted}"


class ScatterImplantedConv(ImplantedConv):
    """The naive layout: kept and implanted outputs written into a zero tensor at their original positions.

    Functionally equal to :class:`ImplantedConv` with un-permuted consumers; it allocates and fills a
    fresh tensor per call. Used by ``benchmarks/implant_speed.py`` and as a test oracle for the
    permutation the real surgery does.
    """

    def __init__(self, kept: nn.Module, implant: nn.Module, kept_pos: Sequence[int], implanted_pos: Sequence[int]):
        super().__init__(kept, implant)
        dev = kept.weight.device
        self.register_buffer("kept_pos", torch.tensor(list(kept_pos), dtype=torch.long, device=dev), persistent=False)
        self.register_buffer(
            "implanted_pos", torch.tensor(list(implanted_pos), dtype=torch.long, device=dev), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.kept(x)
        b = self.implant(x)
        out = a.new_zeros(a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
        out.index_copy_(1, self.kept_pos, a)
        out.index_copy_(1, self.implanted_pos, b)
        return out


def _pointwise_padding(conv: nn.Module) -> tuple[int, ...] | None:
    """Padding that aligns a 1 x 1 conv (same stride) with ``conv``'s filter centres, or None if none does.

    A k x k conv with dilation d and padding p reads input position ``o*s - p + d*(k-1)/2`` at its centre;
    a 1 x 1 conv with padding q reads ``o*s - q``. They agree for every input size iff ``q = p - d*(k-1)/2``
    is a non-negative integer (``"same"``-style padding, odd k).
    """
    if isinstance(conv.padding, str):
        return None
    out = []
    for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding, strict=True):
        span = d * (k - 1)
        if span % 2 or p < span // 2:
            return None
        out.append(p - span // 2)
    return tuple(out)


def implant_unsupported_reason(conv: nn.Module, kind: str) -> str | None:
    """Why ``conv`` cannot carry an implant of ``kind``; ``None`` when it can.

    Supported: a non-transposed ``Conv1d/2d/3d`` with ``groups=1``, zero padding and a kernel larger
    than 1 (a 1 x 1 conv has nothing cheaper to become). ``pointwise`` also needs the 1 x 1 conv to
    align with the filter centres (odd kernel, ``padding >= dilation*(k-1)/2``).
    """
    if kind not in IMPLANT_KINDS:
        raise ValueError(f"unknown implant {kind!r}: use 'pointwise', 'lowrank' or None")
    if not isinstance(conv, _CONV_TYPES):
        return f"it is a {type(conv).__name__}, not a Conv1d/2d/3d"
    if conv.groups != 1:
        return f"it is a grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"its padding_mode is {conv.padding_mode!r}, not 'zeros'"
    if math.prod(conv.kernel_size) == 1:
        return "it is already a 1x1 convolution"
    if kind == "pointwise" and _pointwise_padding(conv) is None:
        return f"a 1x1 conv cannot align with its kernel {conv.kernel_size} / padding {conv.padding}"
    return None


def implant_block_reason(root: str, members: Iterable[tuple[str, nn.Module | None, str]]) -> str | None:
    """Why the channels of group root ``root`` cannot carry an implant; ``None`` when they can.

    The one implantability rule, used by the planner (on the units' parameter slices) and by the surgery
    (on the traced graph): implants go only to groups with a single producer whose channels pass through
    nothing but BatchNorms before reaching consumers that are Linear or ungrouped convolutions. A residual
    group (several producers tied by an add) would keep the other producers' k x k filters for those
    channels, so an implant there saves little and mixes an approximation into an exact sum.

    Args:
        root: Qualified name of the group's root layer.
        members: ``(module name, module, role)`` for every layer holding the group's channels, role
            ``"out"`` (produces or normalises them) or ``"in"`` (consumes them).
    """
    for mname, m, role in members:
        if role == "out":
            if mname == root or isinstance(m, _BatchNorm):
                continue
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                return f"several layers produce these channels ('{mname}' too: a residual add)"
            return f"the channels pass through '{mname}' ({type(m).__name__})"
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)):
            return f"the channels feed '{mname}' ({type(m).__name__}), which cannot be reordered"
    return None


def implant_params(kind: str, n: int, in_channels: int, kernel_numel: int, rank: int = 0, bias: bool = False) -> int:
    """Parameters of an implant producing ``n`` channels from ``in_channels`` inputs (k*k = ``kernel_numel``)."""
    if kind == "pointwise":
        return n * in_channels + (n if bias else 0)
    if kind == "lowrank":
        return rank * in_channels * kernel_numel + n * rank + (n if bias else 0)
    raise ValueError(f"unknown implant {kind!r}: use 'pointwise' or 'lowrank'")


def lowrank_rank(n: int, in_channels: int, kernel_numel: int, cost: float) -> int:
    """Largest rank whose factorisation costs at most ``cost`` x the ``n`` filters it replaces (0: none).

    A rank-``r`` implant has ``r*(C_in*k*k + n)`` weights against ``n*C_in*k*k`` for the original filters;
    rank above ``min(n, C_in*k*k)`` adds nothing, so the result is capped there.
    """
    if n < 1 or in_channels < 1:
        return 0
    fan = in_channels * kernel_numel
    r = math.floor(cost * n * fan / (fan + n) + 1e-9)
    return max(0, min(r, n, fan))


def _new_conv(like: nn.Module, cin: int, cout: int, kernel: Any, bias: bool, **conv_kw: Any) -> nn.Module:
    p = like.weight
    return type(like)(cin, cout, kernel, bias=bias, device=p.device, dtype=p.dtype, **conv_kw)


def _spatial_kw(conv: nn.Module) -> dict[str, Any]:
    return {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
    }


def slice_conv(conv: nn.Module, rows: Sequence[int]) -> nn.Module:
    """A copy of ``conv`` with only output channels ``rows`` (in that order)."""
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=conv.weight.device)
    new = _new_conv(conv, conv.in_channels, len(rows), conv.kernel_size, conv.bias is not None, **_spatial_kw(conv))
    with torch.no_grad():
        new.weight.copy_(conv.weight.index_select(0, idx))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.index_select(0, idx))
    return new


def pointwise_implant(source: nn.Module) -> nn.Module:
    """Zero-initialised 1 x 1 conv standing in for ``source`` (a conv holding only the implanted filters).

    The bias, if any, is copied: the implanted channel then outputs exactly what its filter would output
    on a zero kernel, the state the masked-model equivalence of the tests relies on.
    """
    reason = implant_unsupported_reason(source, "pointwise")
    if reason is not None:
        raise ValueError(f"cannot give a pointwise implant to this conv: {reason}")
    pad = _pointwise_padding(source)
    ones = (1,) * len(source.kernel_size)
    new = _new_conv(source, source.in_channels, source.out_channels, ones, source.bias is not None,
                    stride=source.stride, padding=pad)
    with torch.no_grad():
        new.weight.zero_()
        if source.bias is not None:
            new.bias.copy_(source.bias)
    return new


def lowrank_implant(source: nn.Module, rank: int) -> nn.Sequential:
    """Rank-``rank`` factorisation of ``source`` (the implanted filters) from their truncated SVD.

    ``W = U S V^T`` with ``W`` of shape ``n x (C_in*k*k)``: the k x k conv gets ``sqrt(S_r) V_r^T``, the 1 x 1
    conv ``U_r sqrt(S_r)`` (splitting ``S`` evenly keeps both factors on the same scale, which SGD likes)
    and the original bias. At full rank the product is ``W`` up to float rounding.

    Raises:
        ValueError: The conv cannot carry an implant, or ``rank`` is outside ``1..min(n, C_in*k*k)``.
    """
    reason = implant_unsupported_reason(source, "lowrank")
    if reason is not None:
        raise ValueError(f"cannot give a low-rank implant to this conv: {reason}")
    w = source.weight
    n, cin = w.shape[0], w.shape[1]
    full = min(n, w[0].numel())
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in 1..{full} for {n} filters of {w[0].numel()} weights, got {rank}")
    u, s, vh = torch.linalg.svd(w.detach().reshape(n, -1).to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    first = _new_conv(source, cin, rank, source.kernel_size, False, **_spatial_kw(source))
    ones = (1,) * len(source.kernel_size)
    second = _new_conv(source, rank, n, ones, source.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).reshape(rank, *w.shape[1:]).to(w.dtype))
        second.weight.copy_((u[:, :rank] * root[None, :]).reshape(n, rank, *ones).to(w.dtype))
        if source.bias is not None:
            second.bias.copy_(source.bias)
    return nn.Sequential(first, second)


def implanted_conv(
    conv: nn.Module,
    n_kept: int,
    kind: str,
    rank: int | None = None,
    kept_pos: Sequence[int] | None = None,
    implanted_pos: Sequence[int] | None = None,
) -> ImplantedConv:
    """Split ``conv``: output channels ``0..n_kept-1`` stay, the rest are implanted.

    Args:
        conv: The pruned convolution whose output channels are laid out kept-first.
        n_kept: Number of leading channels kept as k x k filters.
        kind: ``"pointwise"`` or ``"lowrank"``.
        rank: Rank of a ``lowrank`` implant.
        kept_pos, implanted_pos: Give both to build the naive :class:`ScatterImplantedConv` instead,
            writing the two parts to these output positions.
    """
    if not 0 < n_kept < conv.out_channels:
        raise ValueError(f"need 0 < n_kept < {conv.out_channels} channels, got n_kept={n_kept}")
    kept = slice_conv(conv, range(n_kept))
    source = slice_conv(conv, range(n_kept, conv.out_channels))
    if kind == "pointwise":
        implant = pointwise_implant(source)
    elif kind == "lowrank":
        if rank is None:
            raise ValueError("a lowrank implant needs its rank: the plan records it per group")
        implant = lowrank_implant(source, rank)
    else:
        raise ValueError(f"unknown implant {kind!r}: use 'pointwise' or 'lowrank'")
    if kept_pos is not None and implanted_pos is not None:
        return ScatterImplantedConv(kept, implant, kept_pos, implanted_pos)
    return ImplantedConv(kept, implant)


def calibrate(
    pruned: nn.Module,
    original: nn.Module,
    plan: Any,
    batches: Iterable[Any],
    *,
    ridge: float = 1e-3,
    max_batches: int = 8,
) -> dict[str, float]:
    """Least-squares fit of every pointwise implant to the original filters' outputs on real inputs.

    For each :class:`ImplantedConv` with a 1 x 1 implant at name ``m``, the inputs ``X`` it sees in the
    *pruned* model and the outputs ``Y`` of the implanted channels of ``original``'s conv ``m`` are
    collected over ``batches``; the implant's weights and bias become the ridge solution of
    ``Y ~ W X + b`` at the strided positions the 1 x 1 conv reads. Layers are fitted one after the other
    in the order the forward pass reaches them, each on inputs produced by the already-fitted layers
    before it, so errors are corrected rather than compounded. Both models must share layer names, i.e.
    ``pruned = hap.prune(original, plan)``.

    Args:
        pruned: The pruned model (modified in place).
        original: The model whose outputs the implants should reproduce, usually the unpruned one the
            plan was made on (read only).
        plan: The :class:`hap.PruningPlan` that made ``pruned`` from ``original``.
        batches: Inputs, or ``(inputs, targets)`` pairs.
        ridge: Tikhonov weight relative to the mean diagonal of ``X^T X``: keeps the solve stable when
            inputs are nearly collinear (ReLU features often are).
        max_batches: Batches used.

    Returns:
        Relative residual ``||Y - W X - b|| / ||Y||`` per calibrated layer.

    Raises:
        ValueError: ``batches`` is empty.
    """
    named_p = dict(pruned.named_modules())
    named_o = dict(original.named_modules())
    layers = {
        g.name: sorted(g.implanted)
        for g in plan.groups
        if g.implanted
        and isinstance(named_p.get(g.name), ImplantedConv)
        and not isinstance(named_p[g.name].implant, nn.Sequential)
    }
    if not layers:
        return {}
    inputs = []
    for i, b in enumerate(batches):
        if i >= max_batches:
            break
        inputs.append(b[0] if isinstance(b, tuple | list) and len(b) == 2 else b)
    if not inputs:
        raise ValueError("batches is empty: calibrate needs at least one batch of inputs")

    # targets, and the order in which the forward pass reaches the layers
    ys: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    order: list[str] = []
    hooks = []
    for name, rows in layers.items():
        hooks.append(named_o[name].register_forward_hook(_grab_y(ys[name], torch.tensor(rows, dtype=torch.long))))
        hooks.append(named_p[name].register_forward_pre_hook(_note(order, name)))
    try:
        with eval_mode(pruned), eval_mode(original), torch.no_grad():
            call_model(original, inputs[0])
            for x in inputs[1:]:
                call_model(original, x)
            call_model(pruned, inputs[0])
    finally:
        for h in hooks:
            h.remove()

    residuals = {}
    for name in order:
        pw = named_p[name].implant
        xs: list[torch.Tensor] = []
        h = named_p[name].register_forward_pre_hook(_grab_x(xs, pw))
        try:
            with eval_mode(pruned), torch.no_grad():
                for x_in in inputs:
                    call_model(pruned, x_in)
        finally:
            h.remove()
        x = torch.cat(xs)
        y = torch.cat(ys[name])
        if pw.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        gram = x.T @ x
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        sol = torch.linalg.solve(gram + lam * eye, x.T @ y)  # [C(+1), n]
        with torch.no_grad():
            pw.weight.copy_(sol[: pw.in_channels].T.reshape(pw.weight.shape).to(pw.weight.dtype))
            if pw.bias is not None:
                pw.bias.copy_(sol[-1].to(pw.bias.dtype))
        residuals[name] = float((y - x @ sol).norm() / y.norm().clamp_min(1e-12))
    return residuals


def _note(order: list[str], name: str) -> Callable[..., None]:
    def hook(mod: nn.Module, inp: Any) -> None:
        if name not in order:
            order.append(name)

    return hook


def _grab_y(out: list[torch.Tensor], rows: torch.Tensor) -> Callable[..., None]:
    def hook(mod: nn.Module, inp: Any, y: torch.Tensor) -> None:
        y = y.index_select(1, rows.to(y.device))
        out.append(y.movedim(1, -1).reshape(-1, len(rows)).double())

    return hook


def _grab_x(out: list[torch.Tensor], pw: nn.Module) -> Callable[..., None]:
    """Inputs at the positions the 1x1 conv ``pw`` reads (its padding and stride applied)."""

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0]
        if any(pw.padding):
            x = nn.functional.pad(x, [q for p in reversed(pw.padding) for q in (p, p)])
        sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in pw.stride)
        out.append(x[sl].movedim(1, -1).reshape(-1, x.shape[1]).double())

    return hook
