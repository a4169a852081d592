"""Hutchinson estimates of per-unit Hessian traces ``Tr(H_uu)``: the engine behind the HAP score.

One Rademacher vector ``v`` over *all* unit parameters, one Hessian-vector product ``Hv``, and
``v_u . (Hv)_u`` for every unit from that one product: ``E[v_u . (Hv)_u] = Tr(H_uu)`` because
``E[v_i v_j] = [i == j]``. The cost of a sample is one HVP for the whole network, not one per layer.

Why this is written by hand: PyHessian and friends estimate one trace per layer or per model and
re-run the product per block; none reduces one product into thousands of structured units, exposes
the estimator's own uncertainty, or stops when the ranking has settled.

Variance is the practical problem. ``v_u . (Hv)_u`` contains cross terms ``v_i H_ij v_j`` with every
other parameter ``j`` the vector touches, so each unit's estimate is noisy and few samples can rank units
no better than chance. The engine therefore records every sample, reports per-unit standard errors and
a split-half rank stability, stops when either settles, and offers two variance-reduction options:
``probe="partitioned"`` (each product's vector covers only a subset of the units, which removes the
cross terms with all other subsets) and ``curvature="fisher"`` (the Monte-Carlo Fisher, equal to the
Gauss-Newton matrix for softmax cross-entropy: positive by construction, computed exactly from
per-example gradients under labels sampled from the model, no probe vector at all).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import grad, jvp, vmap
from tqdm.auto import tqdm

from .. import distributed as dist_
from .._hf import eager_attention
from .._utils import call_model, check_loss, eval_mode, materialize_batches
from ..distributed import all_reduce_max, all_reduce_sum, collective, world_size
from ..units.base import Unit
from .fisher import FisherSampler, functional
from .reduce import UnitReducer
from .stats import SampleStats

__all__ = ["TraceEstimate", "estimate_traces"]

LossFn = Callable[[Any, Any], torch.Tensor]
_RANK_SEED_STRIDE = 1_000_003  # rank r draws from seed + r * stride: independent streams, rank 0 unchanged


@dataclass
class TraceEstimate:
    """Per-unit curvature traces with the evidence of how far to trust them.

    Attributes:
        trace: Mean estimate of ``Tr(H_uu)`` (or of the Fisher block trace) per unit.
        trace_se: Standard error of each mean (sample std / sqrt(samples of that unit)).
        samples_per_unit: How many samples each unit's mean averages.
        samples: Probe products (or per-example gradients for the Fisher) computed in total.
        batches: Distinct batches the samples were drawn on.
        split_half: Spearman correlation between the scores from the even and the odd samples: the
            reliability of a ranking built from *half* the samples (a lower bound on the full one).
        median_rel_se: Median over units of ``se / |mean|`` of the trace.
        converged: Whether a stopping criterion was met before ``max_samples``.
        stop_reason: Which one, in words.
        wall_time_s: Seconds spent, including the first gradient of each batch.
        backend: HVP implementation used (``double_backward`` or ``functorch``) or ``fisher``.
        history: ``(samples, seconds, split_half, median_rel_se)`` at each check, for stability-per-second
            comparisons.
        samples_matrix: Per-sample per-unit estimates (``NaN`` where a partitioned probe skipped the unit),
            kept only when asked for.
        fisher_backend: What served the Fisher's per-example squared gradients (``hooks``, ``vmap`` or
            ``hooks+vmap``); empty for the Hessian.
    """

    trace: np.ndarray
    trace_se: np.ndarray
    samples_per_unit: np.ndarray
    samples: int
    batches: int
    split_half: float
    median_rel_se: float
    converged: bool
    stop_reason: str
    wall_time_s: float
    backend: str
    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    samples_matrix: np.ndarray | None = None
    fisher_backend: str = ""


def _rademacher(shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(dtype).mul_(2).sub_(1)


def _probes(
    shapes: Mapping[str, torch.Size],
    k: int,
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | Mapping[str, torch.device],
) -> dict[str, torch.Tensor]:
    """``k`` Rademacher vectors per parameter, ``{name: [k, *shape]}``, drawn in ``shapes`` order.

    One draw for all parameters, split into views: the CPU generator fills a tensor element by element, so
    this is the very same stream as one draw per parameter (bitwise), at one kernel launch and one cast
    instead of three per parameter. ``device``: where the vectors go, one for all or one per parameter
    (a model spread over devices).
    """
    sizes = [k * s.numel() for s in shapes.values()]
    flat = _rademacher(torch.Size((sum(sizes),)), gen, dtype)
    if not isinstance(device, Mapping):
        flat, device = flat.to(device), {}
    parts = zip(shapes.items(), flat.split(sizes), strict=True)
    return {n: (part if n not in device else part.to(device[n])).view(k, *s) for (n, s), part in parts}


def _unit_masks(units: Sequence[Unit], shapes: Mapping[str, torch.Size], part_of: np.ndarray, k: int):
    """For each partition, a 0/1 mask per parameter covering the elements of that partition's units."""
    masks: list[dict[str, torch.Tensor]] = []
    for p_i in range(k):
        ms: dict[str, torch.Tensor] = {}
        for u_i, unit in enumerate(units):
            if part_of[u_i] != p_i:
                continue
            for s in unit.slices:
                m = ms.setdefault(s.param, torch.zeros(shapes[s.param]))
                m.index_fill_(s.dim, torch.tensor(s.indices), 1.0)
        masks.append(ms)
    return masks


class _HVP:
    """Hessian-vector products on one batch, with the first-order graph reused across vectors."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        params: dict[str, torch.Tensor],
        batch: tuple[Any, Any],
        batch_index: int,
        backend: str,
    ) -> None:
        self.backend = backend
        self.names = list(params)
        inputs, targets = batch
        if backend == "double_backward":
            self.tensors = [params[n] for n in self.names]
            loss = loss_fn(call_model(model, inputs), targets)
            check_loss(loss, batch_index)
            self.grads = torch.autograd.grad(loss, self.tensors, create_graph=True, allow_unused=True)
            missing = [n for n, g in zip(self.names, self.grads, strict=True) if g is None]
            if missing:
                raise ValueError(
                    f"the loss does not depend on parameter '{missing[0]}' named by the units: the units "
                    "come from another model, or the layer is unused in forward"
                )
        else:
            detached = {n: p.detach() for n, p in params.items()}

            def f(ps: dict[str, torch.Tensor]) -> torch.Tensor:
                return loss_fn(functional(model, ps, inputs), targets)

            with torch.no_grad():
                check_loss(f(detached), batch_index)
            self.primal = detached
            self.grad_f = grad(f)

    def __call__(self, vs: dict[str, torch.Tensor], batched: bool) -> dict[str, torch.Tensor]:
        if self.backend == "double_backward":
            out = torch.autograd.grad(
                self.grads,
                self.tensors,
                grad_outputs=[vs[n] for n in self.names],
                retain_graph=True,
                is_grads_batched=batched,
            )
            return {n: o.detach() for n, o in zip(self.names, out, strict=True)}

        def one(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return jvp(self.grad_f, (self.primal,), (v,))[1]

        return vmap(one)(vs) if batched else one(vs)


@collective
def estimate_traces(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any] | Sequence[tuple[Any, Any]],
    units: Sequence[Unit],
    *,
    max_samples: int = 512,
    min_samples: int = 32,
    tol: float = 0.05,
    stability: float | None = 0.95,
    samples_per_batch: int = 8,
    max_batches: int = 16,
    probe: str = "global",
    partitions: int = 4,
    vectors_per_product: int = 1,
    curvature: str = "hessian",
    backend: str = "auto",
    scope: str = "all",
    score_weight: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    keep_samples: bool = False,
    max_seconds: float | None = None,
    fisher_backend: str = "auto",
) -> TraceEstimate:
    """Estimate ``Tr(H_uu)`` for every unit; stop when the estimates settle.

    Args:
        model: The network; put in eval mode during estimation, its modes restored after.
        loss_fn: ``loss_fn(model_outputs, targets) -> scalar``.
        batches: ``(inputs, targets)`` pairs; up to ``max_batches`` are kept and visited round-robin.
        units: What to estimate, e.g. from :func:`hap.channel_groups`.
        max_samples: Upper bound on samples (probe products, or examples for the Fisher).
        min_samples: No stopping before this many.
        tol: Stop when the median relative standard error of the traces is at most this.
        stability: Stop when the split-half rank correlation of the scores reaches this (None: off).
        samples_per_batch: Probe vectors per visit of a batch: the first-order graph built for the batch
            is shared by them, so more per visit is cheaper per sample.
        max_batches: How many batches to draw from ``batches``.
        probe: ``"global"`` (one vector over all units) or ``"partitioned"`` (vector ``k`` covers only the
            units of partition ``k``: no cross terms between partitions, ``partitions`` times the products).
        partitions: Number of partitions for ``probe="partitioned"``.
        vectors_per_product: Vectors batched into one vectorised product (``vmap``/``is_grads_batched``).
        curvature: ``"hessian"`` (Hutchinson) or ``"fisher"`` (exact per-example Monte-Carlo Fisher trace).
        backend: ``"double_backward"``, ``"functorch"`` (``jvp`` over ``grad``), or ``"auto"`` (the first,
            measured faster on CPU in ``benchmarks/hessian_engine.py``, with the second as fallback).
        scope: Which slices of each unit enter its trace: ``"all"`` or ``"producer"``.
        score_weight: Per-unit factor turning a trace into the score the ranking uses (``||w||^2 / n``);
            used only for the split-half stability, so the stopping rule watches the ranking that matters.
        seed: Seeds the probe vectors, the partitions and the Fisher's sampled labels.
        progress: Show a progress bar.
        keep_samples: Keep the per-sample matrix in the result (tests and studies).
        max_seconds: A time budget: stop (unconverged) once it is spent, checked after each batch visit.
        fisher_backend: ``"auto"``, ``"vmap"`` or ``"hooks"``: see :class:`hap.estimate.fisher.FisherSampler`.

    Raises:
        ValueError: Bad settings, empty batches, units naming missing parameters.
        RuntimeError: A non-finite loss.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if min_samples < 1 or samples_per_batch < 1 or max_batches < 1 or vectors_per_product < 1:
        raise ValueError("min_samples, samples_per_batch, max_batches and vectors_per_product must be >= 1")
    if probe not in ("global", "partitioned"):
        raise ValueError(f"probe must be 'global' or 'partitioned', got {probe!r}")
    if curvature not in ("hessian", "fisher"):
        raise ValueError(f"curvature must be 'hessian' or 'fisher', got {curvature!r}")
    if backend not in ("auto", "double_backward", "functorch"):
        raise ValueError(f"backend must be 'auto', 'double_backward' or 'functorch', got {backend!r}")
    if not units:
        raise ValueError("no units to estimate")
    if probe == "partitioned" and partitions < 1:
        raise ValueError("partitions must be >= 1")
    min_samples = min(min_samples, max_samples)

    data = materialize_batches(batches, max_batches)
    all_params = dict(model.named_parameters())
    names = sorted({s.param for u in units for s in u.slices})
    for n in names:
        if n not in all_params:
            raise ValueError(
                f"a unit names parameter '{n}' that the model does not have: the units come from another model"
            )
    params = {n: all_params[n] for n in names}
    shapes = {n: p.shape for n, p in params.items()}
    reducer = UnitReducer(units, shapes, scope=scope)
    # Under torch.distributed each rank draws its own probes / labels (rank 0 keeps ``seed``: one process
    # is unchanged) on its own batches; the samples are shared out so that all ranks together take
    # ``max_samples``, and the statistics and every stopping decision are collective (SampleStats, _agree).
    world, me = world_size(), dist_.rank()
    gen = torch.Generator().manual_seed(seed + _RANK_SEED_STRIDE * me)
    stats = SampleStats(len(units))
    history: list[tuple[int, float, float, float]] = []
    start = time.perf_counter()

    part_of = np.zeros(len(units), dtype=np.int64)
    masks: list[dict[str, torch.Tensor]] | None = None
    if probe == "partitioned" and partitions > 1:
        # Round-robin over a seeded permutation inside each group: every layer is split evenly, so
        # every partition sees all layers and no layer's units wait for a whole sweep.
        rng = np.random.default_rng(seed)
        by_group: dict[str, list[int]] = {}
        for i, u in enumerate(units):
            by_group.setdefault(u.group, []).append(i)
        for idx in by_group.values():
            perm = rng.permutation(len(idx))
            for rank, j in enumerate(perm):
                part_of[idx[j]] = rank % partitions
        masks = _unit_masks(units, shapes, part_of, partitions)

    chosen = "fisher" if curvature == "fisher" else ("double_backward" if backend == "auto" else backend)
    sampler = FisherSampler(model, loss_fn, params, reducer, fisher_backend) if curvature == "fisher" else None
    if sampler is not None and fisher_backend == "hooks" and sampler.fallback:
        warnings.warn(_fallback_note(sampler.fallback), stacklevel=2)
    converged = False
    reason = f"max_samples={max_samples} reached before tol={tol} or stability={stability}"
    samples = 0
    visits = 0
    product = 0
    dtype = next(iter(params.values())).dtype
    devices = {n: p.device for n, p in params.items()}
    device = next(iter(devices.values())) if len(set(devices.values())) == 1 else devices
    bar = tqdm(total=max_samples, desc=f"curvature ({curvature})", disable=not progress or me != 0, leave=False)
    # Fused attention kernels have no second derivative on CPU: Hugging Face models switch to eager
    # attention for the estimate and back after, without the caller having to know.
    with eval_mode(model), eager_attention(model):
        while samples < max_samples:
            before = samples
            share = _share(max_samples - samples, world, me)
            b_i = visits % len(data)
            batch = data[b_i]
            visits += 1
            if curvature == "fisher":
                assert sampler is not None
                new = sampler(batch, b_i, gen, share) if share > 0 else []
                for row in new:
                    stats.add(row)
                samples += len(new)
                bar.update(len(new))
            elif share > 0:
                try:
                    hvp = _HVP(model, loss_fn, params, batch, b_i, chosen)
                except (RuntimeError, NotImplementedError) as e:  # functorch can't trace some modules
                    if backend == "auto" and chosen == "double_backward" and "loss is" not in str(e):
                        chosen = "functorch"
                        hvp = _HVP(model, loss_fn, params, batch, b_i, chosen)
                    else:
                        raise
                todo = min(samples_per_batch, share)
                while todo > 0:
                    k = min(vectors_per_product, todo)
                    mask = masks[product % partitions] if masks is not None else None
                    active = part_of == (product % partitions) if masks is not None else None
                    product += 1
                    # drawn on the CPU generator, used where the weights are
                    vs = _probes(shapes, k, gen, dtype, device)
                    if mask is not None:
                        vs = {n: v * mask[n].to(v.device) if n in mask else torch.zeros_like(v) for n, v in vs.items()}
                    hv = hvp(vs, batched=True) if k > 1 else hvp({n: v[0] for n, v in vs.items()}, batched=False)
                    if k > 1:
                        t = reducer({n: vs[n] * hv[n] for n in names}, batched=True).numpy()
                    else:
                        t = reducer({n: vs[n][0] * hv[n] for n in names}).numpy()[None]
                    for row in t:
                        if active is not None:
                            row = np.where(active, row, np.nan)
                        stats.add(row)
                    samples += k
                    todo -= k
                    bar.update(k)
                del hvp
            if world > 1:
                samples = before + all_reduce_sum(samples - before)
                if samples == before:
                    break  # no rank had anything left to sample (cannot happen while share >= 1 on rank 0)
            if samples >= min_samples:
                mean, se, count, split, med_rel = stats.summary(score_weight)
                history.append((samples, time.perf_counter() - start, split, med_rel))
                bar.set_postfix(split_half=f"{split:.3f}", rel_se=f"{med_rel:.3f}")
                if _agree(med_rel <= tol):
                    converged, reason = True, f"median relative standard error {med_rel:.3g} <= tol {tol}"
                    break
                if stability is not None and _agree(split >= stability):
                    converged, reason = True, f"split-half rank stability {split:.3f} >= {stability}"
                    break
            if max_seconds is not None and _agree(time.perf_counter() - start >= max_seconds):
                reason = f"time budget max_seconds={max_seconds} spent before tol={tol} or stability={stability}"
                break
    bar.close()
    mean, se, count, split, med_rel = stats.summary(score_weight)
    return TraceEstimate(
        trace=mean,
        trace_se=se,
        samples_per_unit=count,
        samples=samples,
        batches=all_reduce_sum(min(visits, len(data))),
        split_half=split,
        median_rel_se=med_rel,
        converged=converged,
        stop_reason=reason,
        wall_time_s=time.perf_counter() - start,
        backend=chosen,
        history=history,
        samples_matrix=stats.matrix() if keep_samples else None,
        fisher_backend="" if sampler is None else sampler.backend,
    )


def _share(remaining: int, world: int, me: int) -> int:
    """This rank's part of the ``remaining`` samples (the first ranks take the remainder)."""
    return remaining // world + int(me < remaining % world)


def _agree(flag: bool) -> bool:
    """A stopping decision every rank takes together: true if it holds on any rank."""
    return bool(all_reduce_max(float(flag))) if world_size() > 1 else flag


def _fallback_note(fallback: Mapping[str, str]) -> str:
    first, why = next(iter(fallback.items()))
    return (f"fisher_backend='hooks' cannot serve {len(fallback)} parameter(s) (e.g. '{first}': {why}); "
            "they use per-example gradients (vmap)")
