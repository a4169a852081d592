"""Per-example squared gradients per unit slice from layer hooks, without per-example gradients.

The Fisher trace of a unit is a sum, over its parameter slices, of squared per-example gradient entries.
The ``vmap`` path (:func:`hap.estimate.fisher.per_example_grads`) materialises ``B`` copies of every unit
parameter's gradient (and ``vmap``'s batched intermediates) to get them. What the reducer needs is far
less: for a slice along dim ``d`` of parameter ``p``, the per-example sum of squared gradient entries for
every index along ``d`` (a row norm or a column norm). For a Linear layer with inputs ``a_n`` (``T x in``,
``T`` the sequence positions, 1 without) and output gradients ``g_n`` (``T x out``), the per-example
gradient is ``G_n = g_nᵀ a_n``, and

- row ``j`` (dim 0): ``||G_n[j]||² = g_n[:, j]ᵀ (a_n a_nᵀ) g_n[:, j]``, which for ``T = 1`` is
  ``g_nj² ||a_n||²``;
- column ``c`` (dim 1): ``||G_n[:, c]||² = a_n[:, c]ᵀ (g_n g_nᵀ) a_n[:, c]``;
- bias: ``(sum_t g_ntj)²``.

A convolution is the same with the unfolded input patches (im2col) as ``a_n`` and the output positions
as ``T``, one block per group. When the ``T x T`` Gram matrices cost more than the layer's per-example
gradient itself (large images, small layers) that one layer's ``G_n`` is formed instead, transiently,
as BackPACK's ``BatchL2Grad`` does for convolutions. Normalisation layers (BatchNorm in eval mode,
LayerNorm) have per-example gradients as small as their parameters, ``sum g * x_hat`` and ``sum g``, so
those are formed directly. Everything is computed inside the output-gradient hook of each layer, so
at most one layer's intermediates are alive at a time.

Why by hand: BackPACK's extensions return one norm per parameter tensor (not per row and column), need
its own module wrappers, and do not follow Hugging Face models; Opacus' per-sample gradients are the
materialised ones this module exists to avoid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import call_model
from ..repair.lsq import unfold_patches

__all__ = ["HookPlan", "lean_support"]

LossFn = Callable[[Any, Any], torch.Tensor]
_CONVS = (nn.Conv1d, nn.Conv2d)


def _why_unsupported(module: nn.Module) -> str | None:
    """``None`` if the hooks can serve the module's parameters, else why not (one phrase)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, _CONVS):
        return None  # padding modes and "same" padding are handled by the unfold
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats or module.running_mean is None:
            return "a BatchNorm without running statistics mixes the examples of a batch"
        return None
    if isinstance(module, nn.LayerNorm):
        return None
    return f"{type(module).__name__} layers are not supported by the hook path"


def lean_support(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Which parameters the hook path can serve.

    Returns:
        ``{param: (module name, attribute)}`` for the supported ones and ``{param: reason}`` for the rest.
    """
    modules = dict(model.named_modules())
    ok: dict[str, tuple[str, str]] = {}
    why: dict[str, str] = {}
    for p in names:
        mname, _, attr = p.rpartition(".")
        m = modules.get(mname)
        if m is None or attr not in ("weight", "bias") or getattr(m, attr, None) is None:
            why[p] = "not the weight or bias of a module"
            continue
        reason = _why_unsupported(m)
        if reason is None:
            ok[p] = (mname, attr)
        else:
            why[p] = reason
    return ok, why


def _rows_cols(g: torch.Tensor, a: torch.Tensor, dims: set[int], full: bool) -> dict[Any, torch.Tensor]:
    """Per-example squared row / column sums of ``G = g a^T`` for ``g [B, K, O, T]``, ``a [B, K, I, T]``.

    ``K`` is the number of independent blocks (conv groups; 1 for Linear). Returns ``{0: [B, K*O],
    1: [B, I] (summed over blocks), "full": [B, K*O, I]}`` as asked.
    """
    b, k, o, t = g.shape
    i = a.shape[2]
    out: dict[Any, torch.Tensor] = {}
    if _forms_g(o, i, t, full):
        return _from_weight_grads(torch.einsum("bkot,bkit->bkoi", g, a), dims, full)
    if t == 1:
        if 0 in dims:
            out[0] = (g[..., 0] ** 2 * (a[..., 0] ** 2).sum(2, keepdim=True)).reshape(b, k * o)
        if 1 in dims:
            out[1] = (a[..., 0] ** 2 * (g[..., 0] ** 2).sum(2, keepdim=True)).sum(1)
        return out
    if 0 in dims:
        ka = a.transpose(2, 3) @ a  # [B, K, T, T]
        out[0] = ((g @ ka) * g).sum(3).reshape(b, k * o)
    if 1 in dims:
        kg = g.transpose(2, 3) @ g
        out[1] = ((a @ kg) * a).sum((1, 3))
    return out


def _forms_g(o: int, i: int, t: int, full: bool, conv: bool = False) -> bool:
    """Whether forming the per-example gradient ``G`` costs less than the two ``T x T`` Gram matrices.

    Their multiply-adds are ``O I T`` and ``T^2 (O + I)``. For a convolution ``G`` comes from the library's
    weight-gradient kernel (:func:`_conv_weight_grads`) while the Grams need the im2col patches too, which
    moves the break-even to about ``O I = 8/7 T (O + I)`` (measured on CPU: ResNet-20's strided 32 -> 64
    layer, ratio 1.07, 1.8x faster formed; its 64 -> 64 layers at 7 x 7, ratio 1.18, a tie; 64 -> 64 at
    4 x 4, ratio 3.6, 7x slower formed).
    """
    return full or (8 if conv else 7) * t * (o + i) >= 7 * o * i


def _from_weight_grads(gw: torch.Tensor, dims: set[int], full: bool) -> dict[Any, torch.Tensor]:
    """:func:`_rows_cols`'s outputs from the per-example gradients ``gw [B, K, O, I]`` themselves."""
    b, k, o, i = gw.shape
    out: dict[Any, torch.Tensor] = {}
    sq = gw * gw
    if 0 in dims:
        out[0] = sq.sum(3).reshape(b, k * o)
    if 1 in dims:
        out[1] = sq.sum((1, 2))
    if full:
        out["full"] = gw.reshape(b, k * o, i)
    return out


def _conv_weight_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``[B, *weight.shape]`` of a Conv1d/Conv2d from its input and output gradient.

    One grouped convolution backward with the examples as extra groups (``B * groups`` of them): the
    convolution library's own weight-gradient kernel, without the im2col patches that
    ``einsum(g, unfold(x))`` reads and writes (2-4x faster on CPU for ResNet-20's layers, same values to
    float rounding).
    """
    b = x.shape[0]
    if module.padding_mode != "zeros" or isinstance(module.padding, str):  # "same" and non-zero modes
        pad = list(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode) if any(pad) else x
        padding = [0] * (x.dim() - 2)
    else:
        padding = list(module.padding)
    w = module.weight
    groups = module.groups * b
    shape = (w.shape[0] * b, *w.shape[1:])
    gw = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), w.new_empty((1,) * w.dim()).expand(shape),
        None, list(module.stride), padding, list(module.dilation), False, [0] * (x.dim() - 2), groups,
        [False, True, False],
    )[1]
    return gw.reshape(b, *w.shape)


class HookPlan:
    """Serves per-example squared-gradient marginals of the supported parameters for one estimate.

    Args:
        model: The network (in eval mode while used).
        params: The unit parameters, by qualified name (the live tensors).
        needs: ``{param: (dims whose marginals are needed, whether the full elementwise square is)}``, as
            :meth:`hap.estimate.reduce.UnitReducer.needs` reports it.
        served: The parameters to serve (a subset of :func:`lean_support`'s supported ones).
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor],
                 needs: Mapping[str, tuple[set[int], bool]], served: Mapping[str, tuple[str, str]]) -> None:
        self.model = model
        self.params = dict(params)
        self.needs = dict(needs)
        modules = dict(model.named_modules())
        self.by_module: dict[str, dict[str, str]] = {}  # module -> {attribute: param name}
        for p, (mname, attr) in served.items():
            self.by_module.setdefault(mname, {})[attr] = p
        self.modules = {m: modules[m] for m in self.by_module}

    def __call__(self, loss_fn: LossFn, inputs: Any, targets: torch.Tensor | Callable[[Any], torch.Tensor],
                 example_loss: Callable[[Any, torch.Tensor], torch.Tensor]) -> tuple[
            dict[tuple[str, int], torch.Tensor], dict[str, torch.Tensor]]:
        """Marginals ``{(param, dim): [B, size]}`` and squared per-example gradients ``{param: [B, *shape]}``.

        ``example_loss(outputs, targets)`` is the sum over examples of each example's own loss, so that the
        output gradient of example ``n`` is the gradient of its loss alone. ``targets`` may be a function of
        the model outputs, called once after the forward pass (labels sampled from the model itself).

        Raises:
            _MultiCall: a served module ran more than once in the forward pass (its per-example gradient
                is a sum over calls, which squared norms per call cannot give).
        """
        marg: dict[tuple[str, int], torch.Tensor] = {}
        full: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}
        handles = []
        # The backward differentiates with respect to a zero scalar added to every served layer's output,
        # not to the parameters: every output gradient the hooks need lies on the way to it, while the
        # summed weight gradients (which nothing uses) are never computed, roughly a third of the backward.
        anchor = torch.zeros((), device=next(iter(self.params.values())).device, requires_grad=True)

        def fwd(mname: str):
            def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
                calls[mname] = calls.get(mname, 0) + 1
                if not isinstance(output, torch.Tensor) or not output.requires_grad:
                    return None
                x = args[0].detach()

                def on_grad(g: torch.Tensor) -> None:
                    self._contribute(mname, module, x, g.detach(), marg, full)

                tapped = output + anchor  # the same values (x + 0 == x), one more node on the way to anchor
                tapped.register_hook(on_grad)
                return tapped
            return hook

        for mname, m in self.modules.items():
            handles.append(m.register_forward_hook(fwd(mname)))
        tensors = [self.params[p] for attrs in self.by_module.values() for p in attrs.values()]
        flags = [t.requires_grad for t in tensors]
        try:
            for t in tensors:
                t.requires_grad_(True)
            with torch.enable_grad():
                outputs = call_model(self.model, inputs)
                multi = sorted(m for m, c in calls.items() if c > 1)
                if multi:
                    raise _MultiCall(multi)
                if callable(targets):  # labels drawn from these very outputs (the Fisher's sampled labels)
                    targets = targets(outputs)
                loss = example_loss(outputs, targets)
                torch.autograd.grad(loss, anchor, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for t, f in zip(tensors, flags, strict=True):
                t.requires_grad_(f)
        squares = {p: g * g for p, g in full.items()}
        return marg, squares

    def _contribute(self, mname: str, module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                    marg: dict[tuple[str, int], torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        attrs = self.by_module[mname]
        b = g.shape[0]
        if isinstance(module, (nn.Linear, *_CONVS)):
            if isinstance(module, nn.Linear):
                gg = g.reshape(b, 1, -1, g.shape[-1]).transpose(2, 3)  # [B, 1, O, T]
            else:
                gg = g.reshape(b, module.groups, g.shape[1] // module.groups, -1)
            if "weight" in attrs:
                p = attrs["weight"]
                dims, need_full = self.needs[p]
                shape = self.params[p].shape
                k, o, t = gg.shape[1:]
                if isinstance(module, nn.Linear):
                    parts = _rows_cols(gg, x.reshape(b, 1, -1, x.shape[-1]).transpose(2, 3), dims, need_full)
                elif _forms_g(o, shape[1:].numel(), t, need_full, conv=True):
                    gw = _conv_weight_grads(module, x, g).reshape(b, k, o, -1)
                    parts = _from_weight_grads(gw, dims, need_full)
                else:
                    cols = unfold_patches(module, x)  # [B, C_in * k, L]
                    parts = _rows_cols(gg, cols.reshape(b, k, cols.shape[1] // k, cols.shape[2]), dims, need_full)
                if need_full:
                    full[p] = full.get(p, 0) + parts["full"].reshape(b, *shape)
                else:
                    if 0 in dims:
                        _add(marg, (p, 0), parts[0])
                    if 1 in dims:
                        k = parts[1].shape[1] // shape[1]  # kernel positions per input channel
                        _add(marg, (p, 1), parts[1].reshape(b, shape[1], k).sum(2))
            if "bias" in attrs:
                p = attrs["bias"]
                gb = gg.sum(3).reshape(b, -1)
                full[p] = full.get(p, 0) + gb
            return
        if isinstance(module, nn.LayerNorm):
            shape = tuple(module.normalized_shape)
            xhat = F.layer_norm(x, shape, None, None, module.eps)
            red = tuple(range(1, g.dim() - len(shape)))
        else:  # BatchNorm in eval mode: the running statistics normalise each example alone
            if module.training:
                raise _MultiCall([f"{mname} (BatchNorm in train mode)"])
            view = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x - module.running_mean.view(view)) / torch.sqrt(module.running_var.view(view) + module.eps)
            red = tuple(range(2, g.dim()))
        if "weight" in attrs:
            p = attrs["weight"]
            gw = (g * xhat).sum(red) if red else g * xhat
            full[p] = full.get(p, 0) + gw
        if "bias" in attrs:
            p = attrs["bias"]
            gb = g.sum(red) if red else g
            full[p] = full.get(p, 0) + gb


def _add(acc: dict[tuple[str, int], torch.Tensor], key: tuple[str, int], value: torch.Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value


class _MultiCall(RuntimeError):
    """A served module ran more than once per forward pass (or cannot be served in its current mode)."""

    def __init__(self, modules: Sequence[str]) -> None:
        super().__init__(f"module(s) {', '.join(modules)} run more than once per forward pass")
        self.modules = list(modules)
