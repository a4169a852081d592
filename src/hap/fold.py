"""``hap.fold_batchnorm``: an inference copy with every foldable BatchNorm merged into the layer before it.

In eval mode a BatchNorm is an affine map per channel, so when it reads a convolution's (or a Linear's)
output and nothing else does, it can be merged into that layer's weight and bias, saving one pass over
the activation. The arithmetic is PyTorch's own (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval` and
:func:`~torch.nn.utils.fusion.fuse_linear_bn_eval`); what this module adds is *which* pairs may be folded,
found on a :mod:`torch.fx` graph instead of guessed from module order, because module order lies: in a
pre-activation network (``hap.models.preresnet``) a BatchNorm *precedes* its convolution, and a BatchNorm
after a residual add or a concatenation has no single producer. ``torch.fx.experimental.optimization.fuse``
does the same pattern match but returns a ``GraphModule`` (the model's class, its attributes such as
``input_shape`` and hap's implants are lost), and it does not know Neural Implants; here the copy keeps its
class and structure and the folded BatchNorms become ``nn.Identity``.

A BatchNorm after an :class:`hap.ImplantedConv` (``cat([kept(x), implant(x)])``) is folded too: its first
channels into the kept convolution, the rest into the implant's last convolution.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ._utils import first_line
from .implant import ImplantedConv

__all__ = ["fold_batchnorm", "FoldReport"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes:
        folded: ``(layer, batchnorm)`` module names merged.
        skipped: ``(batchnorm, why)`` for every BatchNorm left in place.
    """

    folded: list[tuple[str, str]]
    skipped: list[tuple[str, str]]


class _Tracer(fx.Tracer):
    """Keeps an exactly-``ImplantedConv`` module whole (its kept/implant split is what folding needs)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) is ImplantedConv or super().is_leaf_module(m, qualname)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _bn_slice(bn: nn.modules.batchnorm._BatchNorm, lo: int, hi: int) -> nn.Module:
    """Channels ``lo:hi`` of an eval-mode BatchNorm as a BatchNorm of their own (same statistics)."""
    part = type(bn)(hi - lo, eps=bn.eps, affine=bn.affine).eval()
    with torch.no_grad():
        part.running_mean.copy_(bn.running_mean[lo:hi])
        part.running_var.copy_(bn.running_var[lo:hi])
        if bn.affine:
            part.weight.copy_(bn.weight[lo:hi])
            part.bias.copy_(bn.bias[lo:hi])
    return part


def _fold_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    return fuse_conv_bn_eval(conv, bn, transpose=False)


def _why_not(producer: nn.Module | None, bn: nn.Module, out_ndim: int | None) -> str | None:
    """Why ``bn`` cannot be merged into ``producer`` (``None``: it can)."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False normalises by the batch)"
    if isinstance(producer, ImplantedConv):
        last = producer.implant[-1] if isinstance(producer.implant, nn.Sequential) else producer.implant
        if not (type(producer.kept) in _CONVS and type(last) in _CONVS and last.groups == 1
                and producer.kept.groups == 1):
            return "the implant's layers are not plain convolutions"
        return None
    if type(producer) in _CONVS:
        return None
    if type(producer) is nn.Linear:
        if out_ndim is None:
            return "a Linear followed by BatchNorm1d folds only when example_inputs show its output is 2-D"
        if out_ndim != 2:
            return f"the Linear's output is {out_ndim}-D, so BatchNorm1d does not normalise its features"
        return None
    return "it does not directly follow a Conv/Linear whose output nothing else reads"


def fold_batchnorm(model: nn.Module, example_inputs: Any = None, *, report: bool = False
                   ) -> nn.Module | tuple[nn.Module, FoldReport]:
    """A copy of ``model`` for inference with every foldable eval-mode BatchNorm merged into its producer.

    A BatchNorm is folded when its only input is the output of a ``Conv1d/2d/3d`` (or of an
    :class:`hap.ImplantedConv`, or of a ``Linear`` with a 2-D output, which needs ``example_inputs`` to
    see), that output feeds nothing else, and both modules are called once per forward. Everything else
    (BatchNorm before a conv as in pre-activation blocks, after an add or a concat, without running
    statistics) is left in place and listed in the report. The copy is in eval mode: folding bakes in the
    running statistics, so the copy is for inference only.

    Args:
        model: Any module :func:`torch.fx.symbolic_trace` can trace (``model`` itself is not modified).
        example_inputs: One batch (tensor, tuple or keyword mapping), only used to check the output rank
            of Linear layers followed by a BatchNorm1d.
        report: Also return a :class:`FoldReport`.

    Returns:
        The folded copy (with ``report=True``: ``(copy, FoldReport)``).

    Raises:
        ValueError: The model cannot be traced (data-dependent control flow): fold by hand, or not at all.
    """
    folded_model = copy.deepcopy(model).eval()
    if not any(isinstance(m, _BNS) for m in folded_model.modules()):  # nothing to fold: no trace needed
        return (folded_model, FoldReport([], [])) if report else folded_model
    try:
        graph = _Tracer().trace(folded_model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError ...)
        raise ValueError(
            f"cannot fold BatchNorm: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
            f"{first_line(e)}); use the model unfolded"
        ) from e
    gm = fx.GraphModule(folded_model, graph)
    shapes: dict[str, int] = {}
    if example_inputs is not None:
        shapes = _output_ranks(gm, example_inputs)
    modules = dict(folded_model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    folded: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], _BNS):
            continue
        bn = modules[n.target]
        src = n.args[0] if n.args else None
        producer = None
        if (len(n.args) == 1 and not n.kwargs and isinstance(src, fx.Node) and src.op == "call_module"
                and len(src.users) == 1 and calls[src.target] == 1 and calls[n.target] == 1):
            producer = modules[src.target]
        why = _why_not(producer, bn, shapes.get(src.name) if isinstance(src, fx.Node) else None)
        if why is None and isinstance(producer, ImplantedConv) and bn.num_features != producer.out_channels:
            why = "its width differs from the implanted conv's output"
        if why is not None:
            skipped.append((n.target, why))
            continue
        assert isinstance(src, fx.Node)
        if isinstance(producer, ImplantedConv):
            k = producer.n_kept
            producer.kept = _fold_conv(producer.kept, _bn_slice(bn, 0, k))
            tail = _bn_slice(bn, k, bn.num_features)
            if isinstance(producer.implant, nn.Sequential):
                producer.implant[-1] = _fold_conv(producer.implant[-1], tail)
            else:
                producer.implant = _fold_conv(producer.implant, tail)
        elif type(producer) is nn.Linear:
            _set(folded_model, src.target, fuse_linear_bn_eval(producer, bn))
        else:
            _set(folded_model, src.target, _fold_conv(producer, bn))
        _set(folded_model, n.target, nn.Identity())
        folded.append((src.target, n.target))
    folded_model.requires_grad_(False)
    if report:
        return folded_model, FoldReport(folded, skipped)
    return folded_model


def _output_ranks(gm: fx.GraphModule, example_inputs: Any) -> dict[str, int]:
    """Rank of each node's tensor output on ``example_inputs`` (a shape propagation through the graph)."""
    from torch.fx.passes.shape_prop import ShapeProp

    if isinstance(example_inputs, dict):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = [example_inputs.get(k) for k in names]
    elif isinstance(example_inputs, tuple | list):
        args = list(example_inputs)
    else:
        args = [example_inputs]
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            out[n.name] = len(meta.shape)
    return out
