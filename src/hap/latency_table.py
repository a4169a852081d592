"""Measuring the per-layer latency table (:mod:`hap.planning.latency`) on this machine, and caching it.

For each distinct Conv/Linear layer shape of the dense model (type, widths, kernel, stride, padding, input
size: ResNet-56's 55 convolutions have 9 shapes), a fresh layer of that shape is timed alone at a grid of
input x output widths (:data:`SHARES` of the dense width, and width 1) with
:class:`torch.utils.benchmark.Timer`, at the table's batch size and thread count, in eval mode without
autograd; a sweep over every output width of the top half of the range (input scaled with it) feeds
:meth:`~hap.planning.latency.LatencyTable.auto_round_to`. The dense model is timed once whole for the rest.

The table is cached as JSON under ``$HAP_CACHE/latency/`` (default ``~/.cache/hap/latency/``), one file per
model architecture, input and grid; the file records :func:`machine_key` (CPU model, cores, threads, torch
version, batch, input shape) and is measured again, and overwritten, when any of them differs, since a
table measured elsewhere predicts nothing here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._utils import atomic_write_text, call_model, eval_mode, model_signature
from ._utils import threads as threads_ctx
from .implant import ImplantedConv
from .planning.latency import LatencyTable, LayerLatency, LayerUse
from .planning.types import input_spec

__all__ = ["measure_table", "machine_key", "cache_dir", "layer_key", "layer_keys", "layer_uses", "predict_ms", "SHARES"]

SHARES = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int, batch_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """What a latency table's times depend on; a cached table is reused only where this is equal."""
    return {"cpu": _cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(), "threads": int(threads),
            "torch": torch.__version__, "batch": int(batch_size), "input": spec}


def cache_dir() -> Path:
    """``$HAP_CACHE/latency`` or ``~/.cache/hap/latency``."""
    root = os.environ.get("HAP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hap") / "latency"


def _tabled(m: nn.Module) -> bool:
    return (type(m) in _CONVS and m.groups == 1) or type(m) is nn.Linear


def layer_key(m: nn.Module, in_shape: Sequence[int]) -> str:
    """The shape of a dense layer and its per-example input (without channels): the table's entry name."""
    rest = "x".join(str(s) for s in in_shape[1:]) or "-"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features},{m.out_features},bias={m.bias is not None})@{rest}"
    return (f"{type(m).__name__}({m.in_channels},{m.out_channels},k={tuple(m.kernel_size)},s={tuple(m.stride)},"
            f"p={tuple(m.padding) if not isinstance(m.padding, str) else m.padding},d={tuple(m.dilation)},"
            f"bias={m.bias is not None},{m.padding_mode})@{rest}")


def _layer_shapes(model: nn.Module, inputs: Any) -> dict[str, tuple[nn.Module, tuple[int, ...], tuple[int, ...]]]:
    """Per tabled layer: ``(module, input shape, output shape)`` of one example (batch dim dropped)."""
    out: dict[str, tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    for name, m in model.named_modules():
        if _tabled(m):
            def hook(mod: nn.Module, args: Any, y: Any, name: str = name) -> None:
                if name not in out and args and isinstance(args[0], torch.Tensor):
                    out[name] = (mod, tuple(args[0].shape[1:]), tuple(y.shape[1:]))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return out


def _widths(full: int, shares: Sequence[float]) -> list[int]:
    return sorted({1, full, *(max(1, round(full * s)) for s in shares)})


def _make(m: nn.Module, cin: int, cout: int) -> nn.Module:
    if isinstance(m, nn.Linear):
        return nn.Linear(cin, cout, bias=m.bias is not None)
    return type(m)(cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                   bias=m.bias is not None, padding_mode=m.padding_mode)


def _timer(fn: Callable[[], Any], threads: int, repeats: int, min_round_s: float) -> float:
    """Fastest round's milliseconds per call over ``repeats`` rounds of :class:`torch.utils.benchmark.Timer`.

    The minimum, not the median (which :func:`hap.bench` reports): a table entry is the layer's own cost,
    and another process sharing the core can only add time to a round, never take it away.
    """
    from torch.utils.benchmark import Timer

    t0 = time.perf_counter()
    fn()
    number = max(1, min(1000, round(min_round_s / max(time.perf_counter() - t0, 1e-6))))
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return min(timer.timeit(number).mean for _ in range(repeats)) * 1e3


def _time_layer(m: nn.Module, in_shape: tuple[int, ...], cin: int, cout: int, batch: int, threads: int,
                repeats: int, min_round_s: float) -> float:
    layer = _make(m, cin, cout).eval().requires_grad_(False)
    if isinstance(m, nn.Linear):
        x = torch.randn(batch, *in_shape[:-1], cin)
    else:
        x = torch.randn(batch, cin, *in_shape[1:])
    return _timer(lambda: layer(x), threads, repeats, min_round_s)


def measure_table(
    model: nn.Module,
    example_inputs: Any,
    *,
    batch_size: int = 64,
    threads: int = 1,
    repeats: int = 5,
    min_round_s: float = 0.002,
    shares: Sequence[float] | None = None,
    sweep: bool = True,
    cache: bool = True,
) -> LatencyTable:
    """The CPU latency table of ``model`` on this machine: loaded from the cache when its key matches, else
    measured (about a minute for a CIFAR ResNet at batch 64, 1 thread) and cached.

    Args:
        model: The dense model (not modified; timed in eval mode without autograd).
        example_inputs: One batch; its rows are cycled to ``batch_size`` (:func:`hap.bench.with_batch`).
        batch_size: Batch the layers and the model are timed at: the prediction is for this batch.
        threads: Torch CPU threads during the measurement (restored afterwards).
        repeats: Timed rounds per grid point (the fastest is kept; see :func:`_timer`).
        min_round_s: A round repeats the call until it lasts about this long.
        shares: Grid widths as shares of the dense width (default :data:`SHARES`; width 1 is always added).
        sweep: Also time every output width of the top half of the range, for ``round_to="auto"``.
        cache: Read and write the cache (``False``: always measure, write nothing).

    Raises:
        ValueError: ``batch_size``, ``threads`` or ``repeats`` below 1, or a model with no Conv/Linear layer.
    """
    from .bench import with_batch

    if batch_size < 1 or threads < 1 or repeats < 1:
        raise ValueError(f"need batch_size, threads and repeats >= 1; got {batch_size}, {threads}, {repeats}")
    spec = input_spec(example_inputs)
    meta = machine_key(threads, batch_size, spec)
    grid_shares = tuple(float(s) for s in (shares or SHARES))
    settings = {"repeats": repeats, "min_round_s": min_round_s, "shares": list(grid_shares), "sweep": sweep}
    name = hashlib.sha256(json.dumps([model_signature(model), spec, settings], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / f"{type(model).__name__}-{name[:16]}.json"
    if cache and path.is_file():
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
            if table.meta == json.loads(json.dumps(meta)):
                return table
        except (ValueError, UnicodeDecodeError):
            pass  # a corrupt or older file is measured again and replaced
    shapes = _layer_shapes(model, example_inputs)
    if not shapes:
        raise ValueError(f"{type(model).__name__} has no Conv/Linear layer to build a latency table for")
    by_key: dict[str, tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = {}
    counts: dict[str, int] = {}
    for m, ins, outs in shapes.values():
        k = layer_key(m, ins)
        by_key.setdefault(k, (m, ins, outs))
        counts[k] = counts.get(k, 0) + 1
    layers: dict[str, LayerLatency] = {}
    x = with_batch(example_inputs, batch_size)

    def time_dense() -> float:
        with eval_mode(model):
            return _timer(lambda: call_model(model, x), threads, max(5, repeats), min_round_s)

    with threads_ctx(threads), torch.inference_mode():
        # the whole model is timed before and after the layers and the faster kept: the rest of the forward
        # is a difference of two measurements, so a load change during the minutes between must not enter it
        dense_first = time_dense()
        for k, (m, ins, outs) in by_key.items():
            cin_full, cout_full = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (
                m.in_channels, m.out_channels)
            ws_in, ws_out = _widths(cin_full, grid_shares), _widths(cout_full, grid_shares)
            ms = [[_time_layer(m, ins, ci, co, batch_size, threads, repeats, min_round_s) for co in ws_out]
                  for ci in ws_in]
            sw, sms = [], []
            if sweep and cout_full > 1:
                sw = list(range(max(1, cout_full // 2), cout_full + 1))
                sms = [_time_layer(m, ins, max(1, round(cin_full * w / cout_full)) if cin_full >= 8 else cin_full, w,
                                   batch_size, threads, repeats, min_round_s) for w in sw]
            positions = math.prod(outs[:-1]) if isinstance(m, nn.Linear) else math.prod(outs[1:])
            layers[k] = LayerLatency(ws_in, ws_out, ms, cin_full, cout_full, positions=max(1, positions),
                                     weights_per_pair=1 if isinstance(m, nn.Linear) else math.prod(m.kernel_size),
                                     sweep_widths=sw, sweep_ms=sms)
        dense_ms = min(dense_first, time_dense())
    table = LatencyTable(meta=json.loads(json.dumps(meta)), layers=layers, counts=counts, dense_ms=dense_ms,
                         rest_ms=0.0, settings=settings)
    table.rest_ms = max(0.0, dense_ms - sum(table.layer_ms(u) for u in table.dense_uses()))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table.to_dict(), indent=1))
    return table


def layer_keys(dense: nn.Module, example_inputs: Any) -> dict[str, str]:
    """Layer name -> table key of every tabled layer of the dense model (one forward of ``example_inputs``)."""
    return {name: layer_key(m, ins) for name, (m, ins, _) in _layer_shapes(dense, example_inputs).items()}


def layer_uses(keys: dict[str, str], model: nn.Module) -> list[LayerUse]:
    """The table layers of ``model`` (a pruned copy of the dense model whose :func:`layer_keys` are ``keys``)
    at their current widths.

    A layer keeps its dense layer's key (same name in both models); an :class:`hap.ImplantedConv` is its
    kept convolution, with the implant's multiply-adds costed at that layer's rate.
    """
    uses = []
    for name, m in model.named_modules():
        if name not in keys:
            continue
        if isinstance(m, ImplantedConv):
            kept = m.kept
            convs = [c for c in m.implant.modules() if isinstance(c, _CONVS)]
            extra = sum(c.out_channels * c.in_channels // c.groups * math.prod(c.kernel_size) for c in convs)
            uses.append(LayerUse(keys[name], kept.in_channels, kept.out_channels, extra, m.n_implanted, len(convs)))
        elif isinstance(m, nn.Linear):
            uses.append(LayerUse(keys[name], m.in_features, m.out_features))
        elif isinstance(m, _CONVS):
            uses.append(LayerUse(keys[name], m.in_channels, m.out_channels))
    return uses


def predict_ms(table: LatencyTable, dense: nn.Module, model: nn.Module, example_inputs: Any) -> float:
    """Predicted milliseconds of ``model`` (a pruned copy of ``dense``) at the table's batch size."""
    return table.predict(layer_uses(layer_keys(dense, example_inputs), model))
