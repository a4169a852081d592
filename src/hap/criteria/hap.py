"""The HAP score: ``Tr(H_uu) / n_u * ||w_u||^2`` with the trace from the curvature estimators.

``Tr(H_uu)/n_u`` is the "relative" trace; times the squared norm it is the second-order loss increase of
zeroing the unit if its Hessian block were isotropic. Estimates are kept *signed*; the planner's ``sign``
chooses how a ranking treats negative ones. Three registered names share the one function:

- ``hap``: ``curvature="auto"`` (the Monte-Carlo Fisher: most stable per second, docs/engine.md);
- ``hap-fisher``: the Fisher, whatever ``curvature`` says;
- ``hap-hessian``: Hutchinson's estimate of the true Hessian trace (the paper's estimator).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..estimate.hutchinson import estimate_traces
from .base import CriterionResult, ScoreContext, register_criterion

_OPTIONS = ("max_samples", "min_samples", "tol", "stability", "samples_per_batch", "max_batches", "probe",
            "partitions", "vectors_per_product", "curvature", "backend", "max_seconds", "fisher_backend")
# Sample bounds per curvature: probe vectors for the Hessian, examples for the Fisher (one example is a
# much cheaper and much less noisy sample than one Hutchinson product).
SAMPLE_BOUNDS = {"fisher": (256, 8192), "hessian": (32, 512)}


def resolve_curvature(curvature: str) -> str:
    if curvature not in ("auto", "fisher", "hessian"):
        raise ValueError(f"curvature must be 'auto', 'fisher' or 'hessian', got {curvature!r}")
    return "fisher" if curvature == "auto" else curvature


def _hap(ctx: ScoreContext, curvature: str) -> CriterionResult:
    cfg = ctx.config
    lo, hi = SAMPLE_BOUNDS[curvature]
    max_samples = hi if cfg.max_samples is None else cfg.max_samples
    min_samples = min(lo, max_samples) if cfg.min_samples is None else cfg.min_samples
    weight = ctx.sq_norms / np.maximum(ctx.counts, 1)
    est = estimate_traces(
        ctx.model, ctx.loss_fn, ctx.data, ctx.units, max_samples=max_samples, min_samples=min_samples, tol=cfg.tol,
        stability=cfg.stability, samples_per_batch=cfg.samples_per_batch, max_batches=cfg.max_batches,
        probe=cfg.probe, partitions=cfg.partitions, vectors_per_product=cfg.vectors_per_product, curvature=curvature,
        backend=cfg.backend, scope=cfg.scope, score_weight=weight, seed=cfg.seed, progress=ctx.progress,
        max_seconds=cfg.max_seconds, fisher_backend=cfg.fisher_backend,
    )
    settings = {k: getattr(replace(cfg, max_samples=max_samples, min_samples=min_samples), k) for k in _OPTIONS}
    settings.update(curvature=curvature, backend=est.backend)
    if curvature == "fisher":
        settings["fisher_backend_used"] = est.fisher_backend
    return CriterionResult(
        scores=est.trace * weight, trace=est.trace, trace_se=est.trace_se, samples=est.samples, batches=est.batches,
        converged=est.converged, stop_reason=est.stop_reason, split_half=est.split_half,
        median_rel_se=est.median_rel_se, settings=settings,
    )


@register_criterion("hap", options=_OPTIONS, description="HAP: relative curvature trace x ||w||^2 (curvature auto = "
                    "Fisher)")
def hap(ctx: ScoreContext) -> CriterionResult:
    return _hap(ctx, resolve_curvature(ctx.config.curvature))


@register_criterion("hap-fisher", options=_OPTIONS, description="HAP score with Monte-Carlo Fisher traces")
def hap_fisher(ctx: ScoreContext) -> CriterionResult:
    return _hap(ctx, "fisher")


@register_criterion("hap-hessian", options=_OPTIONS, description="HAP score with Hutchinson Hessian traces (the "
                    "paper's)")
def hap_hessian(ctx: ScoreContext) -> CriterionResult:
    return _hap(ctx, "hessian")
