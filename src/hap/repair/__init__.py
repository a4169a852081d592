"""Repair: layer-wise least-squares reconstruction of a pruned model (post-training compensation).

Removing units changes what every later layer sees. :func:`repair` refits, in place, the weights of the
pruned model so that each of its layers computes what the same-named layer of the dense model computed:

* **Layers.** Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of the pruned model (inside a
  :class:`hap.ImplantedConv`: its ``.kept`` conv and a pointwise ``.implant``; GPT-2's transposed ``Conv1D``,
  solved as the equivalent ``nn.Linear`` and written back), one after the other in
  the order the forward pass reaches them (found with forward pre-hooks on the first batch).
* **Problem of one layer.** Inputs ``X``: what the layer receives in the pruned model *as repaired so
  far* (so errors of earlier layers are compensated, not compounded). Targets ``Y``: the output of the
  original's same-named layer on the same batch, restricted to the output channels this layer kept.
  Targets are taken *before* any BatchNorm (the layer's own output), so the running statistics of the
  kept channels stay consistent with what the layer now produces. A bias is fitted too (``X`` gets a
  ones column) when the layer has one. Convolutions become matrix problems by unfolding their inputs
  (``torch.nn.functional.unfold``, honouring stride, padding, padding mode and dilation); a grouped
  convolution (depthwise included: one tiny ``k*k`` problem per channel) is one independent problem per
  group.
* **Normal equations.** ``G = XᵀX`` and ``C = XᵀY`` and ``ΣY²`` are accumulated over batches in float64
  (memory ~ ``d_in²`` per layer, never all activations), damped by ``damping * mean(diag(G))`` and solved
  by Cholesky. The new weight is kept only if it does not increase the layer's calibration error
  ``err(W) = tr(WᵀGW) - 2 tr(WᵀC) + ΣY²`` over the current weight, so repair never makes a layer's
  calibration error worse.

**Which output channels a layer kept.** Surgery keeps the surviving rows of a layer in their original
order but does not record them, so :func:`repair` takes the plan (``plan=``): for every planned group
it traces :func:`hap.channel_groups` (or :func:`hap.head_units` for head groups) on the *original* and
reads, from each removed unit's ``ParamSlice`` with role ``"out"`` on ``<layer>.weight`` (dim 0), which
original rows that layer lost; the kept rows are the others, in order. For an ``ImplantedConv`` at
``n`` the ``.kept`` conv reproduces original conv ``n`` at the plan's kept channels (sorted), the
pointwise ``.implant`` those at the implanted channels (sorted). Without a plan only layers whose
output width is unchanged can be repaired, and a narrower layer is an error asking for ``plan=``.

**Speed: one forward pass, not one per layer.** A naive version runs both models from the start for
every layer (quadratic in depth). Here (``strategy="lockstep"``, the default) every calibration batch
runs through each model once, in its own worker thread that pauses in the hook of each layer to be
repaired: the main thread collects the paused inputs (pruned model) and outputs (original) of that
layer from all batches, solves, writes the weight, and lets the pruned forwards continue into the
layer with its new weight. Exactly one thread computes at any time (strict hand-over), so it uses the
threads torch is given and no more. ``strategy="restart"`` is the simple variant: for every layer, each
batch is run from the start and stopped by an exception raised from the hook once the layer's input
(pruned) or output (original) is captured; it needs no threads and serves as a cross-check (both give
bit-identical weights). The price of lockstep is memory: every batch's forward of both models is alive
at once. Measured on ResNet-20 at 50% parameters, 1,024 Fashion-MNIST images, one CPU thread: lockstep
11-13 s and +0.5-0.7 GB peak RSS, restart 31 s and +0.1 GB. Pass fewer/smaller batches, or
``strategy="restart"``, when memory is tight.

Skipped (listed in :attr:`RepairReport.skipped`): low-rank implants (a product of two convs is not one
least-squares problem), ``Conv3d`` (not implemented), layers the forward pass never reaches, layers with
no outputs (the zero-row projections of a layer that lost every head). A layer called several times in
one forward (weight sharing) is fitted on its first call's inputs only.

Text models: when a batch is a mapping with an ``attention_mask`` of shape ``(batch, tokens)``, the
rows of padding tokens are dropped from the problems of layers whose inputs are ``(batch, tokens, d)``.

:func:`obs_costs` and :func:`greedy_obs_select` are the structured OBS criterion on the same layer
Hessian ``H = XᵀX``: what a layer's reconstruction error grows by when a group of its input columns
goes *and the remaining columns compensate*.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._utils import eval_mode, first_line, model_device, uses_threads
from ..distributed import collective
from ._conv1d import conv1d_as_linear
from ._plumbing import (
    _batch_inputs,
    _capture,
    _examples,
    _Layer,
    _mask,
    _order,
    _post_hook,
    _pre_hook,
    _resolve,
    _rss_mb,
    _RssSampler,
    _to,
    _Worker,
)
from .lsq import _Problem, _weight_t, _write_weight_t, unfold_inputs
from .obs import channel_column_groups, greedy_obs_select, obs_costs

__all__ = [
    "LayerRepair",
    "RepairReport",
    "repair",
    "unfold_inputs",
    "channel_column_groups",
    "obs_costs",
    "greedy_obs_select",
]

STRATEGIES = ("lockstep", "restart")


# ----------------------------------------------------------------------------------------------------
# report


@dataclass
class LayerRepair:
    """What repair did to one layer.

    Attributes:
        name: The layer's name in the pruned model.
        source: The original layer whose outputs it reproduces.
        before: Relative calibration error ``||XWᵀ - Y||² / ||Y||²`` with the weights it had.
        after: The same with the weights it has now (``<= before``).
        updated: Whether the least-squares weights were written (``False``: they were not better).
        rows: Calibration rows of the problem (examples x output positions or tokens).
        inputs: Columns of one problem (``C_in/groups * prod(kernel)``, plus 1 for a bias).
        outputs: Output channels fitted.
        groups: Independent problems (the conv's ``groups``; 1 for dense layers).
        seconds: Time spent accumulating and solving this layer's normal equations.
    """

    name: str
    source: str
    before: float
    after: float
    updated: bool
    rows: int
    inputs: int
    outputs: int
    groups: int = 1
    seconds: float = 0.0


@dataclass
class RepairReport:
    """The result of :func:`repair`.

    Attributes:
        layers: Per repaired layer (forward order), what happened.
        skipped: Layers not repaired, with the reason.
        seconds: Wall time of the whole call.
        peak_memory_mb: Growth of resident memory during the call: the largest resident size sampled every
            20 ms (Linux) minus the size at the start; elsewhere the growth of
            ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (0 when the peak was reached before the call;
            a lower bound of what repair needed on top of what was already resident).
        peak_rss_mb: The process's peak resident memory after the call (``ru_maxrss``).
        memory_method: How the memory was measured.
        examples: Calibration examples (leading dimension of the batches' inputs).
        batches: Calibration batches used.
        strategy: ``"lockstep"`` or ``"restart"``.
        damping: The damping used.
    """

    layers: dict[str, LayerRepair] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    peak_rss_mb: float = 0.0
    memory_method: str = "ru_maxrss delta"
    examples: int = 0
    batches: int = 0
    strategy: str = "lockstep"
    damping: float = 0.01

    @property
    def errors(self) -> dict[str, tuple[float, float]]:
        """``{layer: (relative error before, after)}``."""
        return {n: (r.before, r.after) for n, r in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (plain floats, ints, strings)."""
        d = asdict(self)
        d["layers"] = {n: asdict(r) for n, r in self.layers.items()}
        return d

    def summary(self) -> str:
        """A plain-text table, one row per layer, then the totals."""
        rows = [f"{'layer':<36} {'before':>9} {'after':>9} {'rows':>8} {'d_in':>6} {'out':>5}"]
        for r in self.layers.values():
            mark = "" if r.updated else "  (kept old weights)"
            rows.append(f"{r.name:<36} {r.before:>9.4f} {r.after:>9.4f} {r.rows:>8} {r.inputs:>6} {r.outputs:>5}{mark}")
        for n, why in self.skipped.items():
            rows.append(f"{n:<36} skipped: {why}")
        rows.append(
            f"{len(self.layers)} layers repaired on {self.examples} examples ({self.batches} batches) in "
            f"{self.seconds:.2f} s, peak memory +{self.peak_memory_mb:.1f} MB ({self.memory_method})"
        )
        return "\n".join(rows)


@collective
@uses_threads
def repair(
    small: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    *,
    plan: Any = None,
    damping: float = 0.01,
    max_batches: int | None = None,
    layers: Sequence[str] | None = None,
    strategy: str = "lockstep",
    progress: bool = True,
    threads: int | None = None,
) -> RepairReport:
    """Refit, in place, the weights of the pruned ``small`` so each layer reproduces ``original``'s same layer.

    Args:
        small: The pruned model, ``hap.prune(original, plan)`` (same module names); modified in place.
            Its train/eval flags are restored; BatchNorm statistics are left as they are.
        original: The dense model (read only).
        batches: Calibration data: ``(inputs, labels)`` pairs or bare inputs; ``inputs`` a tensor
            (positional) or a mapping (keywords, Hugging Face style). Iterated once.
        plan: The :class:`hap.PruningPlan` that made ``small``; needed as soon as a layer lost output
            channels (it says which ones), not for a model whose layers only lost input columns.
        damping: Added to the diagonal of ``XᵀX`` as a fraction of its mean (of each problem's weights).
        max_batches: Use at most this many batches.
        layers: Only these layers of ``small`` (names; an ImplantedConv's name means both its halves).
        strategy: ``"lockstep"`` (one forward per batch and model, paused per layer in worker threads)
            or ``"restart"`` (every layer reruns the batches from the start up to that layer).
        progress: A tqdm bar over the layers.
        threads: Torch CPU threads for the call (restored after); ``None``: :func:`hap._utils.default_threads`
            (or the enclosing hap call's count).

    Returns:
        A :class:`RepairReport` (per-layer relative errors before/after, seconds, memory, examples).

    Raises:
        ValueError: Empty batches, batches the models cannot take, NaN/inf in the batches or in a layer's
            inputs/outputs, a layer of ``small`` without a same-named counterpart in ``original``, a layer
            whose kept outputs cannot be mapped (pass ``plan=``), unknown names in ``layers``.
        NotImplementedError: ``layers`` names a Conv3d.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'lockstep' or 'restart', got {strategy!r}")
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    t_start = time.perf_counter()
    rss0 = _rss_mb()
    inputs = _batch_inputs(batches, max_batches)
    report = RepairReport(strategy=strategy, damping=float(damping), batches=len(inputs))
    report.examples = sum(_examples(x) for x in inputs)

    with _RssSampler() as rss, eval_mode(small), eval_mode(original):
        found, skipped = _resolve(small, original, plan)
        if layers is not None:
            from ..implant import ImplantedConv

            wanted: set[str] = set()
            implanted = {n for n, m in small.named_modules() if isinstance(m, ImplantedConv)}
            for n in layers:
                if n in implanted:
                    wanted.update(k for k in found if k.startswith(n + "."))
                elif n in found:
                    wanted.add(n)
                elif n in skipped:
                    if "3-d" in skipped[n]:
                        raise NotImplementedError(f"layer '{n}': {skipped[n]}")
                else:
                    raise ValueError(f"layers names '{n}', which is not a Linear/Conv layer of the pruned model")
            skipped = {n: why for n, why in skipped.items() if n in layers}
            found = {n: lay for n, lay in found.items() if n in wanted}
        with conv1d_as_linear(small, original, found):  # GPT-2's Conv1D as Linear while it is refit
            order = _order(small, found, original, inputs[0])
            for n in found:
                if n not in order:
                    skipped[n] = "not reached by the forward pass"
            report.skipped = skipped
            run = _lockstep if strategy == "lockstep" else _restart
            run(small, original, [found[n] for n in order], inputs, float(damping), report, progress)

    report.seconds = time.perf_counter() - t_start
    report.peak_rss_mb = _rss_mb()
    if rss.growth_mb is not None:
        report.peak_memory_mb, report.memory_method = rss.growth_mb, "resident memory sampled every 20 ms"
    else:
        report.peak_memory_mb = max(0.0, report.peak_rss_mb - rss0)
    return report


def _progress(items: list[_Layer], progress: bool) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="repair", unit="layer", leave=False)


def _finish(lay: _Layer, prob: _Problem, damping: float, report: RepairReport) -> None:
    """Solve one layer's problem, keep the better weights, record it."""
    t0 = time.perf_counter()
    prob.finalize()  # under torch.distributed: the normal equations of every rank's batches
    if prob.n == 0:
        report.skipped[lay.name] = "no calibration rows (every row was padding)"
        return
    w_old = _weight_t(lay.module).to(prob.G.device)
    e_old = prob.error(w_old)
    w_new = prob.solve(damping)
    e_new = prob.error(w_new)
    updated = math.isfinite(e_new) and e_new <= e_old
    if updated:
        _write_weight_t(lay.module, w_new)
    denom = prob.yy if prob.yy > 0 else 1.0
    before = max(0.0, e_old) / denom
    after = max(0.0, e_new if updated else e_old) / denom
    report.layers[lay.name] = LayerRepair(
        name=lay.name, source=lay.source, before=before, after=min(after, before), updated=updated, rows=prob.n,
        inputs=prob.G.shape[1], outputs=prob.out, groups=prob.groups,
        seconds=prob.seconds + time.perf_counter() - t0,
    )


def _restart(small: nn.Module, original: nn.Module, order: list[_Layer], inputs: list[Any], damping: float,
             report: RepairReport, progress: bool) -> None:
    named_o = dict(original.named_modules())
    dev_s, dev_o = model_device(small), model_device(original)
    for lay in _progress(order, progress):
        prob = _Problem(lay.name, lay.module, lay.rows, lay.module.weight.device)
        for x in inputs:
            xs = _capture(small, _to(x, dev_s), lay.module, output=False)
            yo = _capture(original, _to(x, dev_o), named_o[lay.source], output=True)
            prob.add(xs, yo.to(xs.device), _mask(x))
        _finish(lay, prob, damping, report)


def _lockstep(small: nn.Module, original: nn.Module, order: list[_Layer], inputs: list[Any], damping: float,
              report: RepairReport, progress: bool) -> None:
    if not order:
        return
    named_o = dict(original.named_modules())
    names = {lay.name for lay in order}
    sources = {lay.source for lay in order}
    hooks = [lay.module.register_forward_pre_hook(_pre_hook(lay.name)) for lay in order]
    hooks += [named_o[s].register_forward_hook(_post_hook(s)) for s in sources]
    dev_s, dev_o = model_device(small), model_device(original)
    workers_s: list[_Worker] = []
    workers_o: list[_Worker] = []
    try:
        workers_s = [_Worker(small, _to(x, dev_s), names) for x in inputs]
        workers_o = [_Worker(original, _to(x, dev_o), sources) for x in inputs]
        at_s = [w.step() for w in workers_s]
        at_o: list[tuple[str, str | None, Any] | None] = [None] * len(inputs)
        used: set[str] = set()
        for lay in _progress(order, progress):
            prob = _Problem(lay.name, lay.module, lay.rows, lay.module.weight.device)
            for b, x in enumerate(inputs):
                xs = _expect(at_s[b], lay.name, b, "pruned")
                if xs is None:
                    continue  # this batch's forward ended without reaching the layer
                msg = at_o[b]
                if msg is None or (msg[0] == "at" and msg[1] != lay.source):
                    if msg is not None and msg[1] not in used:
                        _mismatch(msg[1], lay)
                    msg = at_o[b] = workers_o[b].step()
                    if msg[0] == "at" and msg[1] != lay.source:
                        _mismatch(msg[1], lay)
                yo = _expect(at_o[b], lay.source, b, "original")
                if yo is None:
                    raise ValueError(f"the original's forward on batch {b} never reaches layer '{lay.source}'")
                prob.add(xs, yo.to(xs.device), _mask(x))
                xs = yo = None
            _finish(lay, prob, damping, report)
            used.add(lay.source)
            at_s = [w.step() if m[0] == "at" else m for w, m in zip(workers_s, at_s, strict=True)]
    finally:
        for w in workers_s + workers_o:
            w.close()
        for h in hooks:
            h.remove()


def _mismatch(reached: str | None, lay: _Layer) -> None:
    raise ValueError(
        f"the original reaches layer '{reached}' where the pruned model reaches '{lay.name}' (original "
        f"'{lay.source}'): small and original must be the same architecture (small = hap.prune(original, plan))"
    )


def _expect(msg: tuple[str, str | None, Any] | None, name: str, b: int, what: str) -> torch.Tensor | None:
    if msg is None:
        return None
    kind, at, payload = msg
    if kind == "error":
        e = payload
        raise ValueError(
            f"calibration batch {b} does not fit the {what} model ({type(e).__name__}: {first_line(e)}): "
            "give every batch the form and shape the model takes"
        ) from e
    if kind != "at":
        return None
    if at != name:
        raise ValueError(
            f"on batch {b} the {what} model reaches layer '{at}' where '{name}' was expected: the forward order "
            "must be the same for every batch"
        )
    return payload


# ----------------------------------------------------------------------------------------------------
# structured OBS on a layer Hessian (pure tensor functions)


