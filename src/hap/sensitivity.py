"""``hap.sensitivity``: model + data -> per-unit scores (units x criterion), saved as a readable JSON file.

The HAP score of unit ``u`` is ``Tr(H_uu) / n_u * ||w_u||^2``: the second-order loss increase of zeroing
the unit if its Hessian block were isotropic (``H_uu ~ Tr(H_uu)/n_u * I``). Estimates are kept *signed*:
a negative trace is either noise around a small positive value or real negative curvature of a model
that has not converged; :meth:`Sensitivity.ranking_scores` lets the planner choose how to treat it
(``"signed"``, the reference code's behaviour, ranks negative units first for removal).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import criteria
from ._utils import atomic_write_text, first_line, materialize_batches, model_signature, uses_threads
from .config import SensitivityConfig
from .criteria.base import CriterionResult, ScoreContext
from .distributed import all_reduce_max, all_reduce_sum, broadcast_object, collective, is_main, world_size
from .estimate.reduce import UnitReducer
from .units import Unit, family_for_kind, get_family

__all__ = ["UnitSensitivity", "Sensitivity", "sensitivity", "model_signature"]

FORMAT_VERSION = 1


@dataclass
class UnitSensitivity:
    """One unit and how much the loss is expected to care about it.

    Attributes:
        unit: The parameter slices the unit stands for.
        n: Number of weights in the unit (within the scope the score used).
        sq_norm: ``||w_u||^2`` over the same slices.
        score: The criterion's value; larger means more important.
        trace: Estimated ``Tr(H_uu)`` (HAP only).
        trace_se: Its standard error (HAP only).
    """

    unit: Unit
    n: int
    sq_norm: float
    score: float
    trace: float | None = None
    trace_se: float | None = None

    @property
    def group(self) -> str:
        return self.unit.group

    @property
    def index(self) -> int:
        return self.unit.index

    @property
    def slices(self) -> tuple:
        return self.unit.slices

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unit.to_dict(),
            "n": self.n,
            "sq_norm": self.sq_norm,
            "score": self.score,
            "trace": self.trace,
            "trace_se": self.trace_se,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitSensitivity:
        return cls(
            Unit.from_dict(d),
            int(d["n"]),
            float(d["sq_norm"]),
            float(d["score"]),
            None if d.get("trace") is None else float(d["trace"]),
            None if d.get("trace_se") is None else float(d["trace_se"]),
        )


@dataclass
class Sensitivity:
    """Scores of every unit of a model, with how they were obtained and how reliable they are.

    Attributes:
        method: Criterion (``hap``, ``l1``, ``l2``, ``taylor``, ``obd``, ``random``).
        units: One entry per unit.
        model_signature: Identifies the architecture the units index into.
        samples: Curvature samples used (HAP); batches visited otherwise.
        batches: Distinct batches used.
        wall_time_s: Seconds the estimate took.
        converged: Whether the stopping rule was met (always True for one-pass criteria).
        stop_reason: Why estimation stopped.
        split_half: Split-half rank correlation of the scores (HAP), NaN when not measured.
        median_rel_se: Median relative standard error of the traces (HAP).
        settings: The resolved options, so the estimate can be rerun.
    """

    method: str
    units: list[UnitSensitivity]
    model_signature: str
    samples: int = 0
    batches: int = 0
    wall_time_s: float = 0.0
    converged: bool = True
    stop_reason: str = ""
    split_half: float = float("nan")
    median_rel_se: float = float("nan")
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def scores(self) -> np.ndarray:
        return np.array([u.score for u in self.units], dtype=np.float64)

    def ranking_scores(self, sign: str = "signed") -> np.ndarray:
        """Scores for ranking: ``"signed"`` as estimated, ``"clamp"`` negatives to 0, or ``"abs"``."""
        s = self.scores
        if sign == "signed":
            return s
        if sign == "clamp":
            return np.maximum(s, 0.0)
        if sign == "abs":
            return np.abs(s)
        raise ValueError(f"sign must be 'signed', 'clamp' or 'abs', got {sign!r}")

    def by_group(self) -> dict[str, list[UnitSensitivity]]:
        out: dict[str, list[UnitSensitivity]] = {}
        for u in self.units:
            out.setdefault(u.group, []).append(u)
        return out

    def digest(self) -> str:
        """Content hash, so a plan can name the sensitivity it came from: the scores and how they were
        obtained, not the wall time (a rerun of the same estimate, e.g. a resumed ``hap prune``, gets the
        same digest and so the same plan)."""
        d = {k: v for k, v in self.to_dict().items() if k != "wall_time_s"}
        return hashlib.sha256(json.dumps(d, allow_nan=False, default=_json_default).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["units"] = [u.to_dict() for u in self.units]
        for k in ("split_half", "median_rel_se"):
            if d[k] is not None and not np.isfinite(d[k]):
                d[k] = None
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"sensitivity format version {d.get('version')} is not {FORMAT_VERSION}")
        d = dict(d)
        d["units"] = [UnitSensitivity.from_dict(u) for u in d["units"]]
        bad = next((u for u in d["units"] if not np.isfinite(u.score)), None)
        if bad is not None:  # never from hap.sensitivity (it refuses them): an edited or corrupted file
            raise ValueError(f"unit {bad.unit.name} has the non-finite score {bad.score}")
        for k in ("split_half", "median_rel_se"):
            if d.get(k) is None:
                d[k] = float("nan")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        try:
            return cls.from_dict(json.loads(text))
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as e:
            raise ValueError(f"not a valid sensitivity JSON ({type(e).__name__}: {first_line(e)})") from e

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file then rename): a crash never leaves half a file. Under
        ``torch.distributed`` only rank 0 writes (every rank holds the same sensitivity); not a collective,
        so calling it on rank 0 alone is fine too."""
        if not is_main():
            return Path(path)
        return atomic_write_text(Path(path), self.to_json(indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sensitivity:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no sensitivity file at '{p}': run 'hap sensitivity' first")
        try:
            return cls.from_json(p.read_text())
        except ValueError as e:  # UnicodeDecodeError too; the message names the file
            raise ValueError(f"'{p}' is {first_line(e)}: recompute it (hap sensitivity)") from e

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` is not the architecture this sensitivity was computed on."""
        sig = model_signature(model)
        if sig != self.model_signature:
            raise ValueError(
                f"this sensitivity was computed on another model (signature {self.model_signature}, "
                f"this model {sig}): recompute it on this model"
            )

    def layer_summary(self) -> list[dict[str, Any]]:
        """One row per group: size, mean/min/max score, mean trace and relative SE."""
        rows = []
        for g, us in self.by_group().items():
            s = np.array([u.score for u in us])
            row: dict[str, Any] = {
                "group": g,
                "units": len(us),
                "weights_per_unit": int(np.mean([u.n for u in us])),
                "score_mean": float(s.mean()),
                "score_min": float(s.min()),
                "score_max": float(s.max()),
            }
            tr = [u.trace for u in us if u.trace is not None]
            if tr:
                se = np.array([u.trace_se for u in us], dtype=float)
                t = np.array(tr)
                row["trace_mean"] = float(t.mean())
                row["negative"] = int((t < 0).sum())
                with np.errstate(divide="ignore", invalid="ignore"):
                    row["rel_se_median"] = float(np.nanmedian(np.abs(se / t)))
            rows.append(row)
        return rows


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _first_inputs(data: Sequence[tuple[Any, Any]]) -> Any:
    x = data[0][0]
    return dict(x) if isinstance(x, dict) else x


def _input_record(x: Any) -> dict[str, Any]:
    """What the planner needs to rebuild an example input: shapes (batch 1) and dtypes.

    Integer token ids passed positionally need their dtype recorded, not only their shape, or the
    planner would rebuild them as floats.
    """
    if isinstance(x, torch.Tensor):
        return {"input_shape": list(x.shape[1:]), "input_dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, Mapping):  # keyword inputs (text models): names, shapes and dtypes at batch 1
        return {"input_spec": {"kwargs": {
            str(k): {"shape": [1, *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in x.items() if isinstance(v, torch.Tensor)
        }}}
    return {}


def _is_names(units: Any) -> bool:
    return isinstance(units, tuple | list) and bool(units) and all(isinstance(u, str) for u in units)


def _family_names(units: str | Sequence[str]) -> list[str]:
    """``"heads,neurons"`` or ``("heads", "neurons")`` -> ``["heads", "neurons"]`` (order kept, no repeats)."""
    parts = units.split(",") if isinstance(units, str) else list(units)
    names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names:
        raise ValueError(f"units={units!r} names no unit family: use e.g. 'channels', 'heads' or 'heads,neurons'")
    return names


def _discover(spec: str, model: nn.Module, example: Any, exclude: Sequence[str]) -> list[Unit]:
    """The units of every family ``spec`` names, family after family: one pool the criterion scores
    together and the planner ranks together (joint heads + neurons)."""
    out: list[Unit] = []
    owner: dict[str, str] = {}
    for name in _family_names(spec):
        for u in get_family(name).discover(model, example, exclude):
            if owner.setdefault(u.group, name) != name:
                raise ValueError(f"units {owner[u.group]!r} and {name!r} both name group '{u.group}': "
                                 "score these families separately")
            out.append(u)
    return out


@uses_threads
@collective
def sensitivity(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[Any],
    units: str | Sequence[str] | Sequence[Unit] | None = None,
    method: str | None = None,
    *,
    config: SensitivityConfig | None = None,
    progress: bool = True,
    threads: int | None = None,
    **options: Any,
) -> Sensitivity:
    """Score every structured unit of ``model`` by how much the loss depends on it.

    Args:
        model: The trained network. Not modified; its train/eval modes are restored.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar`` (the model's output passed as it is).
        batches: ``(inputs, targets)`` pairs; ``inputs`` a tensor (positional) or a mapping (keywords).
        units: A registered unit family (``"channels"``, the default, traced on the first batch;
            ``"heads"``; ``"neurons"``: feed-forward neurons), several of them scored and ranked together
            (``("heads", "neurons")`` or ``"heads,neurons"``, stored as the latter), or a list of units
            (e.g. from :func:`hap.channel_groups`).
        method: A registered criterion (:func:`hap.criteria.names`): ``"hap"`` (default), ``"hap-fisher"``,
            ``"hap-hessian"``, ``"l1"``, ``"l2"``, ``"taylor"``, ``"obd"``, ``"michel"`` (heads), ``"random"``.
        config: All options at once; keywords in ``options`` override its fields.
        progress: Show progress bars.
        threads: Torch CPU threads for the call (restored after); ``None``: :func:`hap._utils.default_threads`,
            the cores other processes leave free (or the enclosing hap call's count).
        **options: Any field of :class:`hap.config.SensitivityConfig` (``curvature``, ``max_samples``,
            ``tol``, ``stability``, ``max_batches``, ``scope``, ``exclude``, ``seed``, ...). The default
            ``curvature="auto"`` is the Monte-Carlo Fisher: on ResNet-20 its ranking reaches a split-half
            stability of 0.98 in 11 s where 45 s of Hutchinson products reach 0.38 (docs/engine.md).

    Raises:
        ValueError: Unknown method/units/option, a criterion that cannot score these units, empty
            batches, a model without prunable layers, units naming parameters the model lacks,
            non-finite scores.
        RuntimeError: The loss is NaN or infinite.
    """
    cfg = config or SensitivityConfig()
    if "exclude" in options and options["exclude"] is not None:
        options["exclude"] = tuple(options["exclude"])
    elif "exclude" in options:
        options["exclude"] = ()
    cfg = cfg.replace(**options)
    if isinstance(units, str) or _is_names(units):
        cfg = cfg.replace(units=",".join(_family_names(units)))  # type: ignore[arg-type]
    if method is not None:
        cfg = cfg.replace(method=method)
    crit = criteria.get(cfg.method)
    cfg.validate()  # SensitivityConfig.problems: the one statement of the rules (the CLI prints the same)
    start = time.perf_counter()
    data = materialize_batches(batches, cfg.max_batches)
    if units is None or isinstance(units, str) or _is_names(units):
        unit_list = _discover(cfg.units, model, _first_inputs(data), cfg.exclude)
    else:
        unit_list = list(units)
        cfg = cfg.replace(units="given")
    if not unit_list:
        raise ValueError("no units to score: the unit family found none in this model")
    kinds = list(dict.fromkeys(u.kind for u in unit_list))
    fams = [family_for_kind(k) for k in kinds]  # an unknown kind is an error here, never dropped later
    for k in kinds:
        if not crit.supports(k):
            raise ValueError(
                f"criterion {crit.name!r} scores {', '.join(crit.unit_kinds or ())} units, not {k!r} units; "
                f"choose one of {', '.join(criteria.names(k))}"
            )
    named = dict(model.named_parameters())
    shapes: dict[str, torch.Size] = {}
    for u in unit_list:
        for s in u.slices:
            if s.param not in named:
                raise ValueError(
                    f"unit {u.name} names parameter '{s.param}' that the model does not have: "
                    "the units come from another model"
                )
            shapes[s.param] = named[s.param].shape
    reducer = UnitReducer(unit_list, shapes, scope=cfg.scope)
    params = {n: named[n] for n in shapes}
    n_u = reducer.counts().numpy()
    sq = reducer({n: p.detach() ** 2 for n, p in params.items()}).numpy()
    if world_size() > 1 and not np.array_equal(all_reduce_max(sq), -all_reduce_max(-sq)):
        raise ValueError("the model's weights differ across ranks: load the same weights on every rank before "
                         "hap.sensitivity (each rank passes only its own shard of the batches)")
    ctx = ScoreContext(model, loss_fn, data, unit_list, params, reducer, cfg, n_u, sq, progress)
    with contextlib.ExitStack() as stack:
        for fam in fams:
            stack.enter_context(fam.estimation_context(model))
        out = crit.score(ctx)
    res = out if isinstance(out, CriterionResult) else CriterionResult(scores=np.asarray(out, dtype=np.float64))
    if not isinstance(out, CriterionResult) and crit.needs_data:
        res.batches = res.samples = all_reduce_sum(len(data))
    scores = np.asarray(res.scores, dtype=np.float64)
    if scores.shape != (len(unit_list),):
        raise ValueError(f"criterion {crit.name!r} returned {scores.shape} scores for {len(unit_list)} units")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"criterion {crit.name!r} gave non-finite scores for {bad.size} unit(s) (first: {unit_list[bad[0]].name}): "
            "check the model's weights and the data for inf/NaN"
        )
    settings: dict[str, Any] = {"units": cfg.units, "scope": cfg.scope, "seed": cfg.seed,
                                "max_batches": cfg.max_batches}
    if cfg.exclude:
        settings["exclude"] = list(cfg.exclude)
    settings.update(broadcast_object(_input_record(data[0][0])))  # rank 0's shapes: the same on every rank
    if world_size() > 1:
        settings["world_size"] = world_size()
    settings.update(res.settings)
    out_units = [
        UnitSensitivity(
            unit=u,
            n=int(n_u[i]),
            sq_norm=float(sq[i]),
            score=float(scores[i]),
            trace=None if res.trace is None else float(res.trace[i]),
            trace_se=None if res.trace_se is None else float(res.trace_se[i]),
        )
        for i, u in enumerate(unit_list)
    ]
    return Sensitivity(
        method=crit.name,
        units=out_units,
        model_signature=model_signature(model),
        samples=res.samples,
        batches=res.batches,
        wall_time_s=all_reduce_max(time.perf_counter() - start),
        converged=res.converged,
        stop_reason=res.stop_reason,
        split_half=res.split_half,
        median_rel_se=res.median_rel_se,
        settings=settings,
    )
