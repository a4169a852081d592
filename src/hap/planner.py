"""``hap.plan``: which units go, which get a Neural Implant, to meet a target users think in.

The face of :mod:`hap.planning` (pure data and allocation) tied to a model: it reads what the allocator
needs from the model (which groups are excluded, which can carry implants — the one rule of
:func:`hap.implant.implant_block_reason` — and their conv shapes), and hands the search a measuring
function that builds each candidate on a copy with :func:`hap.surgery.apply_groups` and counts it.

A latency target is planned on the per-layer latency table's prediction, then checked by the stopwatch
(:func:`_close_latency_loop`): the planned model is timed against the dense one, and re-planned for a
corrected table target until the measured latency is within ``latency_tol`` of the asked one.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ._utils import call_model, eval_mode, first_line, model_device, model_signature, threads
from .config import PlanConfig
from .implant import lowrank_rank
from .metrics import ModelCost, count_macs_disposable, count_params, measure
from .plan_groups import excluded_modules, group_infos, unit_weights
from .planning import PlanError
from .planning.allocation import candidates, layer_normalized, materialize
from .planning.latency import LatencyTable, next_internal_target
from .planning.search import search
from .planning.types import GroupPlan, PruningPlan, Target, input_spec, make_inputs, pruned_share, sequence_length
from .sensitivity import Sensitivity
from .surgery import apply_groups
from .units import family_for_kind

__all__ = ["plan"]


def plan(
    model: nn.Module,
    sensitivity: Sensitivity,
    target: Target,
    *,
    config: PlanConfig | None = None,
    example_inputs: Any = None,
    latency_table: LatencyTable | None = None,
    **options: Any,
) -> PruningPlan:
    """Choose the units to remove and to implant so that the measured pruned model meets ``target``.

    Every option is a field of :class:`hap.config.PlanConfig` (its defaults are the only ones); pass a
    ``config`` or the fields as keywords (keywords win).

    Args:
        model: The model ``sensitivity`` was computed on (not modified).
        sensitivity: Per-unit scores from :func:`hap.sensitivity`; larger means more important.
        target: E.g. ``Target(params=0.5)``: remove half of the parameters.
        implant_fraction: Of each group's pruned channels, the most sensitive share (rounded) becomes an
            implant instead of being removed. 0 disables implants.
        implant: ``"pointwise"`` (the paper's 1x1 conv), ``"lowrank"`` (truncated-SVD factorisation) or
            ``None``. Only single-producer k x k conv groups can carry implants (see :mod:`hap.surgery`).
        implant_cost: For ``lowrank``: the implant may cost at most this fraction of the parameters of
            the filters it replaces; that fixes its rank. Groups where rank 1 already costs more get a
            pointwise implant.
        max_layer_ratio: At most this fraction of any group is pruned (removed or implanted).
        round_to: Make each group's remaining width (kept + implanted) a multiple of this, for hardware
            friendly shapes (a group narrower than ``round_to`` is left whole). ``"auto"``: the largest
            multiple that the latency table finds free to round up to
            (:meth:`hap.planning.latency.LatencyTable.auto_round_to`); the plan records the choice in
            ``settings["round_to"]`` and its measured costs in ``settings["round_to_auto"]``.
        allocation: ``"uniform"`` (default): the same ratio in every group, least sensitive units first
            within it; ``"even"``: uniform, stopping only where groups of the same size have lost exactly
            the same number of units (same widths in every layer, so :func:`hap.save_pretrained` can write a
            Hugging Face config; under GQA the units are whole KV groups); ``"global"``: rank all units of all
            groups together (the paper's). Uniform is the
            default because it won after fine-tuning in the vision study (docs/results.md): a global
            ranking of per-unit scores ignores what a unit costs, and a residual-stream group (one channel
            shared by every block of a stage) sums its score over all the layers it couples, so global
            ranking keeps those whole and thins a few inner convolutions to a handful of channels, which
            keeps fewer MACs off and fine-tunes no better. See ``rank_by`` for cost-aware global ranking.
        exclude: Layers (names or modules) whose groups must not be touched.
        example_inputs: One input batch; it fixes the input size MACs are counted for and traces the
            graph; for token inputs MACs are counted for its sequence length (``settings["tokens"]`` of
            the plan). Default: the input shape and dtype the sensitivity was computed on (recorded in its
            settings; integer token ids passed positionally stay integers),
            else the model's ``input_shape`` attribute, else a guessed 1 x C x 32 x 32 for a conv net
            (not for a ``flops`` target: MACs depend on the input size).
        sign: How negative sensitivity estimates rank: ``"signed"`` (as estimated: most negative
            first out), ``"clamp"`` (negatives are 0) or ``"abs"``.
        rank_by: ``"score"`` (the paper's), ``"score_per_param"``: the score divided by the number of
            weights the unit's removal deletes, so cheap-to-keep units are not removed for little gain, or
            ``"layer_normalized"``: each group's scores divided by their L2 norm before the global ranking
            (what Michel et al. do to head scores; it spreads the pruning across layers). The key matters
            for ``allocation="global"``; under ``"uniform"`` it only orders groups at the same ratio.
            Which ranks better is a question for the study (DESIGN.md section 1), hence an option.
        tol: Largest accepted ``|achieved - target|`` (as fractions).
        latency_table: For ``Target(latency=...)`` and ``round_to="auto"``: the dense model's per-layer
            latency table (:func:`hap.latency_table.measure_table`); default: that function's, at batch 64
            and 1 thread, loaded from its cache or measured once (about a minute for a CIFAR ResNet). A
            latency target is first planned on the table's *prediction* at its batch size (the sum over
            layers of their times at the planned widths plus the rest of the forward), then measured: see
            ``latency_iters``.
        latency_iters: For ``Target(latency=...)``: the planned model is timed against the dense one with
            :func:`hap.bench` (alternating rounds, median) at the table's batch size and thread count, and
            re-planned for a corrected table target (regula falsi on measured against predicted, see
            :func:`hap.planning.latency.next_internal_target`) until the measured kept latency is within
            ``latency_tol`` of ``1 - target``, at most this many timed plans; the plan measured nearest the
            asked latency is returned. Needed because the table predicts more speed-up than a network
            shows (per-call overhead, caches, per-layer times that do not add up). ``settings["latency"]``
            records every iteration (table target, predicted and measured milliseconds, measured kept
            fraction) and the final ``measured_ratio`` (measured kept / asked kept). 0 trusts the prediction, as
            does a table whose ``meta`` names no ``batch`` and ``threads`` to time at, or a model off the CPU
            (``settings["latency"]["open_loop_reason"]`` says which).
        latency_tol: Relative distance of the measured kept latency from the asked one that ends the loop.

    Returns:
        The plan, with the achieved parameters and MACs measured on the pruned model.

    Raises:
        ValueError: Bad options, a sensitivity from another model, or a ``flops`` target without an
            input size.
        PlanError: The target is out of reach under the limits (the message gives the most that can be
            removed; for a latency target, the most that was *measured* to be removed) or cannot be met
            within ``tol`` because units are too coarse.
    """
    cfg = config or PlanConfig()
    if "exclude" in options:
        ex = options["exclude"]
        options["exclude"] = () if ex is None else ((ex,) if isinstance(ex, str | nn.Module) else tuple(ex))
    cfg = cfg.replace(**options)
    if not isinstance(target, Target):
        raise ValueError(f"target must be a hap.Target, e.g. Target(params=0.5); got {target!r}")
    cfg.validate()  # PlanConfig.problems: the one statement of the rules (the CLI prints the same)
    sensitivity.ranking_scores(cfg.sign)  # validates ``sign`` before any work
    sensitivity.check_model(model)
    if example_inputs is None:
        recorded = (sensitivity.settings.get("input_shape") or sensitivity.settings.get("input_spec")
                    or getattr(model, "input_shape", None))
        if target.kind == "flops" and not recorded:
            raise ValueError(
                "Target(flops=...) counts MACs for an input size: pass example_inputs= (e.g. torch.zeros(1, 3, 32, 32))"
            )
        example_inputs, _ = _default_inputs(model, sensitivity)
        try:
            with threads(1), torch.no_grad(), eval_mode(model):
                call_model(model, example_inputs)
        except Exception as e:
            raise ValueError(
                f"the model does not run on a guessed input of shape {tuple(getattr(example_inputs, 'shape', ()))} "
                f"({type(e).__name__}: {first_line(e)}): "
                "pass example_inputs= (one batch of real inputs)"
            ) from e
    spec = input_spec(example_inputs)
    inputs = make_inputs(spec, device=model_device(model))
    extra: dict[str, Any] = {}
    if target.kind == "latency" or cfg.round_to == "auto":
        if latency_table is None:
            from .latency_table import measure_table

            latency_table = measure_table(model, inputs)
        if cfg.round_to == "auto":
            chosen, costs = latency_table.auto_round_to()
            cfg = cfg.replace(round_to=chosen)
            extra["round_to_auto"] = {"chosen": chosen, "cost_of_rounding_up": {str(m): c for m, c in costs.items()}}
    # The search runs many batch-1 forward passes; with several threads on a busy machine their
    # synchronisation costs more than the arithmetic (10x measured on 2 shared cores), so use one.
    with threads(1):
        p = _plan(model, sensitivity, target, inputs, spec, cfg,
                  latency_table if target.kind == "latency" else None)
    p.settings.update(extra)
    return p


def _default_inputs(model: nn.Module, sens: Sensitivity) -> tuple[Any, str]:
    """Example inputs when the caller gives none, and where they came from (for the error messages)."""
    if sens.settings.get("input_spec"):  # keyword inputs recorded by hap.sensitivity (text models)
        return make_inputs(sens.settings["input_spec"], device=model_device(model)), "recorded"
    shape = sens.settings.get("input_shape") or getattr(model, "input_shape", None)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    recorded = getattr(torch, str(sens.settings.get("input_dtype", "")), None)
    if isinstance(recorded, torch.dtype) and not recorded.is_floating_point:
        dtype = recorded  # integer token ids passed positionally: zeros are valid ids, floats are not
    if shape:
        return torch.zeros(1, *[int(s) for s in shape], dtype=dtype, device=model_device(model)), "recorded"
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nd = len(m.kernel_size)
            p = m.weight
            return torch.zeros(1, m.in_channels, *([32] * nd), dtype=p.dtype, device=p.device), "guessed"
        if isinstance(m, nn.Linear):
            return torch.zeros(1, m.in_features, dtype=m.weight.dtype, device=m.weight.device), "guessed"
    raise ValueError("cannot guess the model's input: pass example_inputs= (one batch of inputs)")


def _plan(model: nn.Module, sens: Sensitivity, target: Target, inputs: Any, spec: dict[str, Any],
          cfg: PlanConfig, table: LatencyTable | None = None) -> PruningPlan:
    implant = cfg.implant if cfg.implant_fraction > 0 else None
    for kind in {u.unit.kind for u in sens.units}:
        family_for_kind(kind)  # an unknown kind is an error, never a silent drop in surgery
    scores = sens.ranking_scores(cfg.sign)
    group_of = [u.group for u in sens.units]
    if cfg.rank_by == "score_per_param":
        scores = scores / np.maximum(unit_weights(model, sens), 1)
    elif cfg.rank_by == "layer_normalized":
        scores = layer_normalized(group_of, scores)
    excluded = excluded_modules(model, cfg.exclude)
    infos = group_infos(model, sens, excluded, implant)
    cands, _ = candidates([(u.group, u.index) for u in sens.units], scores, infos, allocation=cfg.allocation,
                          max_layer_ratio=cfg.max_layer_ratio)
    count_kind = {"channels": "channel", "heads": "head"}.get(target.kind)
    kinds = {g.info.kind for g in cands.groups}
    if count_kind == "head" and "head" not in kinds and "query_slot" in kinds:
        count_kind = "query_slot"  # one query head of every KV group: their share is the share of query heads
    if count_kind and not any(g.info.kind == count_kind for g in cands.groups):
        raise ValueError(
            f"Target({target.kind}=...) needs {count_kind} units, but the sensitivity has none: compute it with "
            f"units={'channels' if count_kind == 'channel' else 'heads'!r} or use Target(params=...)"
        )
    base = measure(model, inputs)
    plans: dict[int, list[GroupPlan]] = {0: []}
    fracs: dict[int, float] = {0: 0.0}
    built: dict[int, tuple[ModelCost, str]] = {}
    predicted: dict[int, float] = {}  # latency targets: the table's prediction per step (ms)
    if table is not None:
        from .latency_table import layer_keys, layer_uses

        keys = layer_keys(model, inputs)
        predicted[0] = table.predict(layer_uses(keys, model))

    def group_plans(s: int) -> list[GroupPlan]:
        if s not in plans:
            plans[s] = materialize(cands, cands.counts_at(s), implant_fraction=cfg.implant_fraction,
                                   implant_cost=cfg.implant_cost, round_to=cfg.round_to, lowrank_rank=lowrank_rank)
        return plans[s]

    def build(s: int, macs: bool = True) -> tuple[ModelCost, str]:
        """Prune a copy as step ``s`` says and measure it (MACs = -1 when not asked for)."""
        if s not in built or (macs and built[s][0].macs < 0):
            pruned = copy.deepcopy(model)
            apply_groups(pruned, group_plans(s), inputs)
            if table is not None:
                predicted[s] = table.predict(layer_uses(keys, pruned))
            n_macs = count_macs_disposable(pruned, inputs) if macs else -1
            built[s] = (ModelCost(count_params(pruned), n_macs), model_signature(pruned))
        return built[s]

    def fraction(s: int) -> float:
        if s not in fracs:
            if count_kind:
                fracs[s] = pruned_share(group_plans(s), count_kind)
            elif table is not None:
                build(s, macs=False)
                fracs[s] = 1.0 - predicted[s] / predicted[0]
            else:
                cost = build(s, macs=target.kind == "flops")[0]
                fracs[s] = 1.0 - (cost.params / base.params if target.kind == "params"
                                  else cost.macs / max(1, base.macs))
        return fracs[s]

    steps = _even_steps(cands) if cfg.allocation == "even" else list(range(cands.n_steps + 1))
    limits = cands.limits_text(cfg.max_layer_ratio)
    best = steps[search(lambda b: fraction(steps[b]), len(steps) - 1, target, cfg.tol, limits)]
    latency: dict[str, Any] = {}
    if table is not None:
        why_open = _open_loop_reason(model, table, cfg)
        if why_open is None:
            def table_step(goal: float) -> int:
                """The step whose predicted removal is nearest ``goal`` (any distance: the loop judges it)."""
                return steps[search(lambda b: fraction(steps[b]), len(steps) - 1, Target(latency=goal), 1.0, limits)]

            def timed(s: int) -> tuple[float, float]:
                pruned = copy.deepcopy(model)
                apply_groups(pruned, group_plans(s), inputs)
                return _time_pair(model, pruned, inputs, int(table.meta["batch"]), int(table.meta["threads"]))

            best, latency = _close_latency_loop(target, cfg, best, steps[-1], table_step, fraction, timed,
                                                predicted, limits, table.meta)
        else:
            latency = {"closed_loop": False, "open_loop_reason": why_open}
    cost, sig = build(best)
    return PruningPlan(
        target=target,
        groups=group_plans(best),
        model_signature=sens.model_signature,
        sensitivity_digest=sens.digest(),
        method=sens.method,
        allocation=cfg.allocation,
        implant=implant,
        implant_fraction=float(cfg.implant_fraction if implant else 0.0),
        inputs=spec,
        base=base.to_dict(),
        achieved=cost.to_dict(),
        pruned_signature=sig,
        settings={
            "max_layer_ratio": cfg.max_layer_ratio,
            "round_to": cfg.round_to,
            "sign": cfg.sign,
            "rank_by": cfg.rank_by,
            "tol": cfg.tol,
            "implant_cost": cfg.implant_cost,
            "exclude": sorted(excluded),
            **({"tokens": tokens} if (tokens := sequence_length(spec)) is not None else {}),
            **({"latency": {"predicted_ms": predicted[best], "dense_ms": predicted[0],
                            "measured_dense_ms": table.dense_ms, "batch": table.meta.get("batch"),
                            "threads": table.meta.get("threads"), "machine": table.meta.get("cpu"), **latency}}
               if table is not None else {}),
        },
    )


_LOOP_REPEATS = 7  # alternating rounds per timed plan (hap.bench's default): each round at batch 64 costs about
# three forwards of both models, a few seconds per iteration for a CIFAR ResNet-56


def _time_pair(dense: nn.Module, pruned: nn.Module, inputs: Any, batch: int, n_threads: int) -> tuple[float, float]:
    """Median milliseconds of ``dense`` and ``pruned`` at ``batch``: :func:`hap.bench`'s alternating rounds in
    one process, at the latency table's batch and threads so that the loop and the table time the same thing.

    Module-level so that tests can replace the stopwatch with a deterministic latency model.
    """
    from .bench import bench

    res = bench(pruned, inputs, baseline=dense, batch_sizes=(batch,), threads=n_threads, repeats=_LOOP_REPEATS,
                memory=False)
    return res.baseline[batch].median_ms, res.pruned[batch].median_ms


def _open_loop_reason(model: nn.Module, table: LatencyTable, cfg: PlanConfig) -> str | None:
    """Why a latency target is planned on the table's prediction alone, or ``None`` to close the loop."""
    if cfg.latency_iters == 0:
        return "latency_iters=0"
    if model_device(model).type != "cpu":
        return f"the model is on {model_device(model)}; the table and hap.bench time CPU latency"
    if not all(isinstance(table.meta.get(k), int) and table.meta[k] >= 1 for k in ("batch", "threads")):
        return "the latency table's meta names no batch and threads to time the plans at"
    return None


def _close_latency_loop(target: Target, cfg: PlanConfig, first: int, last: int, table_step: Any, fraction: Any,
                        timed: Any, predicted: dict[int, float], limits: str,
                        meta: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Time the table's plan (step ``first``) and re-plan until the measured latency meets ``target``.

    Args:
        target: The asked ``Target(latency=t)``: keep ``1 - t`` of the dense latency, as measured.
        cfg: ``latency_iters`` (timed plans at most) and ``latency_tol`` (relative, on the kept latency).
        first: The step the table's prediction chose for ``target``.
        last: The most aggressive step allowed.
        table_step: Table target (fraction of predicted latency removed) -> the step nearest it.
        fraction: Step -> its predicted fraction removed (fills ``predicted``).
        timed: Step -> ``(dense ms, pruned ms)`` measured in one paired run.
        predicted: Step -> predicted milliseconds (read for the record).
        limits: The planner's limits, for the unreachable-target message.
        meta: The table's meta (batch and threads, for the messages).

    Returns:
        The step measured nearest the asked latency, and the record for ``settings["latency"]``.

    Raises:
        PlanError: The most aggressive allowed plan is measured slower than asked (beyond ``latency_tol``);
            the message says how much latency was measured to be removed and what to ask for instead.
    """
    asked = 1.0 - target.value
    cap = min(0.99, fraction(last))
    measured: dict[int, float] = {}
    iterations: list[dict[str, Any]] = []
    points: list[tuple[float, float]] = []
    step, internal = first, target.value
    for i in range(cfg.latency_iters):
        removed = fraction(step)  # predicted, and fills predicted[step]
        dense_ms, pruned_ms = timed(step)
        kept = pruned_ms / dense_ms
        measured[step] = kept
        iterations.append({"internal_target": internal, "predicted_ms": predicted[step],
                           "predicted_kept": 1.0 - removed, "measured_ms": pruned_ms, "measured_dense_ms": dense_ms,
                           "measured_kept": kept})
        if abs(kept / asked - 1.0) <= cfg.latency_tol:
            break
        points.append((removed, kept))
        if kept > asked and removed >= cap - 1e-9:
            best_kept = min(measured.values())
            fix = (f"ask for latency={math.floor((1 - best_kept) * 100) / 100:g} or less, or relax the limits"
                   if best_kept < 0.99 else "pruning removes no measurable latency at this batch: use a Target of "
                   "params or flops, or a latency table at a larger batch")
            raise PlanError(
                f"target {target} cannot be met as measured: the most aggressive allowed plan keeps {kept:.3f} of "
                f"the dense latency at batch {meta.get('batch')}, {meta.get('threads')} thread(s) (the table "
                f"predicted {1 - removed:.3f}; {limits}); {fix}"
            )
        if i + 1 == cfg.latency_iters:
            break
        internal = next_internal_target(points, asked, cap)
        nxt = table_step(max(internal, 1e-6))
        if nxt in measured:  # the steps are too coarse to move the prediction this little: nothing new to time
            break
        step = nxt
    best = min(measured, key=lambda s: (abs(measured[s] / asked - 1.0), s))
    return best, {"closed_loop": True, "asked_kept": asked, "measured_kept": measured[best],
                  "measured_ratio": measured[best] / asked, "converged": abs(measured[best] / asked - 1.0)
                  <= cfg.latency_tol, "latency_tol": cfg.latency_tol, "iterations": iterations}


def _even_steps(cands: Any) -> list[int]:
    """Step counts of the uniform ordering at which every group of the same kind, size and cap has had
    exactly as many units removed (``allocation="even"``): identical widths in identical layers, the
    precondition of a Hugging Face config (:func:`hap.save_pretrained`)."""
    classes = [(len(g.order), g.info.kind, g.cap) for g in cands.groups]
    counts = [0] * len(classes)
    mismatched = 0  # classes whose counts differ now
    members: dict[tuple[int, str, int], list[int]] = {}
    for gi, c in enumerate(classes):
        members.setdefault(c, []).append(gi)
    steps = [0]
    for s, gi in enumerate(cands.step_group, start=1):
        group = members[classes[int(gi)]]
        before = len({counts[g] for g in group}) > 1
        counts[int(gi)] += 1
        mismatched += (len({counts[g] for g in group}) > 1) - before
        if mismatched == 0:
            steps.append(s)
    return steps
