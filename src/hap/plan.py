"""``hap.plan``: which units go, which get a Neural Implant, to meet a target users think in.

A :class:`Target` is a fraction of the model to remove: of its parameters, of its MACs (for a given
input size), of its prunable channels (the reference code's convention) or, for transformers, of its
attention heads. The planner ranks units by their sensitivity (globally across layers as the HAP paper,
or with the same ratio in every layer), applies the limits (the best unit of every group stays, at most
``max_layer_ratio`` of a group goes, widths rounded to ``round_to``, excluded layers untouched), turns the
most sensitive ``implant_fraction`` of each group's candidates into implants, and searches the number of
candidates so that the *measured* result meets the target.

How the target is hit: the cost of a unit is not constant (a residual channel shrinks every layer that
reads it, an implant adds its own layers), so the planner does not add up per-unit estimates. Candidate
sets are nested (the ``k`` least sensitive units, or ratio ``rho`` in every layer); for a given ``k`` it
builds the actual pruned model on a copy (Torch-Pruning surgery, implants included) and counts its
parameters and MACs. A bisection over ``k`` needs ``log2(#units)`` such builds (~0.1 s each for a
ResNet-56), then the closer of the two bracketing plans is kept; if neither is within ``tol`` of the
target the planner says so rather than returning a plan that misses it.

A plan is data: :class:`PruningPlan` lists, per group, kept / implanted / removed channel indices, and
records the target, what was achieved, where the scores came from (method and content hash of the
:class:`hap.Sensitivity`) and which architecture it applies to; ``plan.json`` is its JSON form.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._utils import atomic_write_text, call_model, eval_mode
from .implant import IMPLANT_KINDS, implant_unsupported_reason, lowrank_rank
from .metrics import ModelCost, _count_macs_disposable, count_params, measure
from .sensitivity import Sensitivity, model_signature
from .surgery import apply_groups

__all__ = ["Target", "GroupPlan", "PruningPlan", "plan", "ALLOCATIONS", "PlanError"]

FORMAT_VERSION = 1
ALLOCATIONS = ("global", "uniform")
RANKINGS = ("score", "score_per_param", "layer_normalized")
_TARGET_KINDS = ("params", "flops", "channels", "heads")


class PlanError(ValueError):
    """The target cannot be met under the given limits (the message says why and what to change)."""


@dataclass(frozen=True)
class Target:
    """How much of the model to remove; set exactly one field, a fraction strictly between 0 and 1.

    Attributes:
        params: Fraction of the whole model's parameters removed (implants count as kept).
        flops: Fraction of MACs per example removed, for the planner's ``example_inputs`` size.
        channels: Fraction of prunable channels removed or implanted (the reference code's
            "pruning ratio"; implanted channels count as pruned, as there).
        heads: Fraction of attention heads removed (units from ``hap.sensitivity(..., units="heads")``).
    """

    params: float | None = None
    flops: float | None = None
    channels: float | None = None
    heads: float | None = None

    def __post_init__(self) -> None:
        given = [(k, getattr(self, k)) for k in _TARGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            names = ", ".join(k for k, _ in given) or "none"
            raise ValueError(f"a Target needs exactly one of params=, flops=, channels=, heads= (got {names})")
        k, v = given[0]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0.0 < v < 1.0:
            raise ValueError(
                f"Target({k}={v!r}) must be a fraction strictly between 0 and 1: the share of the model to remove"
            )
        object.__setattr__(self, k, float(v))

    @property
    def kind(self) -> str:
        """``"params"``, ``"flops"``, ``"channels"`` or ``"heads"``."""
        return next(k for k in _TARGET_KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def to_dict(self) -> dict[str, float]:
        return {self.kind: self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        unknown = set(d) - set(_TARGET_KINDS)
        if unknown:
            raise ValueError(f"unknown target field(s) {sorted(unknown)}: use params, flops, channels or heads")
        return cls(**{k: float(v) for k, v in d.items()})

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass
class GroupPlan:
    """What happens to one group's channels (indices into the group's root layer's output channels).

    Attributes:
        name: The group's root layer (the unit group name of the sensitivity).
        size: Channels of the group before pruning.
        kept: Channels kept as they are.
        implanted: Channels replaced by an implant (kept in the layer's output, made cheaply).
        removed: Channels removed from every layer of the group.
        implant: ``"pointwise"`` or ``"lowrank"`` when ``implanted`` is not empty.
        rank: Rank of a ``lowrank`` implant.
        note: Why the group has no implant or is untouched, for a reader of ``plan.json``.
        kind: ``"channel"`` (or ``"head"`` for attention-head groups).
    """

    name: str
    size: int
    kept: list[int]
    implanted: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    implant: str | None = None
    rank: int | None = None
    note: str = ""
    kind: str = "channel"

    def validate(self) -> None:
        """Raise ``ValueError`` unless kept/implanted/removed partition ``range(size)`` and one channel stays."""
        seen = [*self.kept, *self.implanted, *self.removed]
        if sorted(seen) != list(range(self.size)):
            raise ValueError(
                f"group '{self.name}': kept/implanted/removed must partition its {self.size} channels exactly once"
            )
        if not self.kept:
            raise ValueError(f"group '{self.name}' keeps no channel: at least one channel must stay")
        if self.implanted and self.implant not in IMPLANT_KINDS:
            raise ValueError(f"group '{self.name}' implants channels with unknown implant {self.implant!r}")
        if self.implant == "lowrank" and self.implanted and (self.rank is None or self.rank < 1):
            raise ValueError(f"group '{self.name}' has a lowrank implant without a rank >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupPlan:
        g = cls(
            name=str(d["name"]),
            size=int(d["size"]),
            kept=[int(i) for i in d["kept"]],
            implanted=[int(i) for i in d.get("implanted", [])],
            removed=[int(i) for i in d.get("removed", [])],
            implant=None if d.get("implant") is None else str(d["implant"]),
            rank=None if d.get("rank") is None else int(d["rank"]),
            note=str(d.get("note", "")),
            kind=str(d.get("kind", "channel")),
        )
        g.validate()
        return g


@dataclass
class PruningPlan:
    """A pruning decision as data: per group kept / implanted / removed, and what it achieves.

    Attributes:
        target: What was asked.
        groups: One entry per group of the sensitivity, in its order.
        model_signature: :func:`hap.model_signature` of the model the plan applies to.
        sensitivity_digest: :meth:`hap.Sensitivity.digest` of the scores it came from.
        method: The sensitivity's criterion (``hap``, ``l1``, ...).
        allocation: ``"global"`` or ``"uniform"``.
        implant: Implant kind asked for (``None``: no implants).
        implant_fraction: Share of each group's pruned channels implanted instead of removed.
        inputs: Shape and dtype of the example input (batch 1) used to trace the model and count MACs.
        base: Parameters and MACs of the unpruned model.
        achieved: Parameters and MACs of the pruned model, measured.
        pruned_signature: :func:`hap.model_signature` of the pruned model (checked by :func:`hap.save`).
        settings: The remaining options (limits, sign handling, tolerance), so the plan can be rerun.
        version: Format version of ``plan.json``.
    """

    target: Target
    groups: list[GroupPlan]
    model_signature: str
    sensitivity_digest: str
    method: str
    allocation: str
    implant: str | None
    implant_fraction: float
    inputs: dict[str, Any]
    base: dict[str, int]
    achieved: dict[str, int]
    pruned_signature: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # -- what a reader wants to know ------------------------------------------------------------------

    @property
    def params_removed(self) -> float:
        """Fraction of the base model's parameters the pruned model no longer has."""
        return 1.0 - self.achieved["params"] / max(1, self.base["params"])

    @property
    def macs_removed(self) -> float:
        """Fraction of the base model's MACs per example the pruned model no longer spends."""
        return 1.0 - self.achieved["macs"] / max(1, self.base["macs"])

    @property
    def channels_removed(self) -> float:
        """Fraction of the channel groups' channels removed or implanted (the reference's pruning ratio)."""
        return _pruned_share(self.groups, "channel")

    @property
    def heads_removed(self) -> float:
        """Fraction of attention heads removed."""
        return _pruned_share(self.groups, "head")

    def achieved_fraction(self, kind: str | None = None) -> float:
        """The achieved value of ``kind`` (default: the target's) as a fraction removed."""
        kind = kind or self.target.kind
        if kind == "params":
            return self.params_removed
        if kind == "flops":
            return self.macs_removed
        if kind == "channels":
            return self.channels_removed
        if kind == "heads":
            return self.heads_removed
        raise ValueError(f"unknown target kind {kind!r}")

    def example_inputs(self, device: torch.device | str | None = None) -> Any:
        """A batch-1 input of the recorded shape (seeded), to trace the model and count MACs."""
        return make_inputs(self.inputs, device=device)

    def summary(self) -> str:
        """A plain-text table: one row per group, then the totals."""
        rows = [f"{'group':<32} {'size':>5} {'kept':>5} {'impl':>5} {'rem':>5}  note"]
        for g in self.groups:
            rows.append(
                f"{g.name:<32} {g.size:>5} {len(g.kept):>5} {len(g.implanted):>5} {len(g.removed):>5}  {g.note}"
            )
        shares = "".join(
            f", {k} {_pruned_share(self.groups, kind):.4f}"
            for k, kind in (("channels", "channel"), ("heads", "head"))
            if any(g.kind == kind for g in self.groups)
        )
        rows.append(
            f"target {self.target}; removed params {self.params_removed:.4f}, MACs {self.macs_removed:.4f}{shares} "
            f"({self.base['params']} -> {self.achieved['params']} params, "
            f"{self.base['macs']} -> {self.achieved['macs']} MACs per example)"
        )
        return "\n".join(rows)

    # -- serialisation ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "target": self.target.to_dict(),
            "model_signature": self.model_signature,
            "pruned_signature": self.pruned_signature,
            "sensitivity_digest": self.sensitivity_digest,
            "method": self.method,
            "allocation": self.allocation,
            "implant": self.implant,
            "implant_fraction": self.implant_fraction,
            "inputs": self.inputs,
            "base": dict(self.base),
            "achieved": dict(self.achieved),
            "settings": dict(self.settings),
            "groups": [g.to_dict() for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruningPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"plan format version {d.get('version')!r} is not {FORMAT_VERSION}: re-create the plan")
        p = cls(
            target=Target.from_dict(d["target"]),
            groups=[GroupPlan.from_dict(g) for g in d["groups"]],
            model_signature=str(d["model_signature"]),
            sensitivity_digest=str(d["sensitivity_digest"]),
            method=str(d["method"]),
            allocation=str(d["allocation"]),
            implant=None if d.get("implant") is None else str(d["implant"]),
            implant_fraction=float(d["implant_fraction"]),
            inputs=dict(d["inputs"]),
            base={k: int(v) for k, v in d["base"].items()},
            achieved={k: int(v) for k, v in d["achieved"].items()},
            pruned_signature=None if d.get("pruned_signature") is None else str(d["pruned_signature"]),
            settings=dict(d.get("settings", {})),
            version=int(d["version"]),
        )
        make_inputs(p.inputs)  # fail now, not at surgery time, on a malformed input spec
        return p

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        """Parse ``plan.json`` text; any malformation is a one-line ``ValueError``."""
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            why = f"{type(e).__name__}: {first_line(e)}"
            raise ValueError(f"not a valid plan ({why}): re-create it with hap.plan") from e

    def digest(self) -> str:
        """Content hash of the plan."""
        return hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``plan.json`` atomically (temp file then rename)."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no plan file at '{p}': create one with hap.plan(...).save(path)")
        try:
            return cls.from_json(p.read_text())
        except UnicodeDecodeError as e:
            raise ValueError(f"'{p}' is not a valid plan (not UTF-8 text): re-create it with hap.plan") from e


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: error messages here stay one line long."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pruned_share(groups: Sequence[GroupPlan], kind: str) -> float:
    total = sum(g.size for g in groups if g.kind == kind)
    return sum(len(g.removed) + len(g.implanted) for g in groups if g.kind == kind) / max(1, total)


# ----------------------------------------------------------------------------------------------------
# example inputs as data


def input_spec(example_inputs: Any) -> dict[str, Any]:
    """Shape/dtype description of ``example_inputs`` with batch size 1, for ``plan.json``."""
    if isinstance(example_inputs, torch.Tensor):
        shape = list(example_inputs.shape)
        if shape:
            shape[0] = 1
        return {"shape": shape, "dtype": str(example_inputs.dtype).removeprefix("torch.")}
    if isinstance(example_inputs, Mapping):
        return {"kwargs": {str(k): input_spec(v) for k, v in example_inputs.items()}}
    if isinstance(example_inputs, tuple | list):
        return {"args": [input_spec(v) for v in example_inputs]}
    raise ValueError(
        "example_inputs must be a tensor, a tuple of tensors or a mapping of tensors, "
        f"got {type(example_inputs).__name__}"
    )


def make_inputs(spec: Mapping[str, Any], seed: int = 0, device: torch.device | str | None = None) -> Any:
    """Rebuild example inputs from :func:`input_spec` output (seeded normal floats, zero integers)."""
    if "shape" in spec:
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"input spec names an unknown dtype {spec['dtype']!r}")
        shape = [int(s) for s in spec["shape"]]
        if dtype.is_floating_point:
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
        return torch.zeros(shape, dtype=dtype, device=device)
    if "kwargs" in spec:
        return {k: make_inputs(v, seed, device) for k, v in spec["kwargs"].items()}
    if "args" in spec:
        return tuple(make_inputs(v, seed, device) for v in spec["args"])
    raise ValueError("input spec needs 'shape', 'args' or 'kwargs'")


def _default_inputs(model: nn.Module, sens: Sensitivity) -> tuple[Any, str]:
    """Example inputs when the caller gives none, and where they came from (for the error messages)."""
    if sens.settings.get("input_spec"):  # keyword inputs recorded by hap.sensitivity (text models)
        return make_inputs(sens.settings["input_spec"], device=model_device(model)), "recorded"
    shape = sens.settings.get("input_shape") or getattr(model, "input_shape", None)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
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


# ----------------------------------------------------------------------------------------------------
# the planner


@dataclass
class _Group:
    name: str
    order: list[int]  # channel indices, least sensitive first
    cap: int  # most channels that may leave
    kind: str | None  # implant kind this group can carry (None: none)
    note: str
    kernel_numel: int = 1
    in_channels: int = 0
    pointwise_ok: bool = False  # a lowrank group too expensive for rank 1 falls back to pointwise
    unit_kind: str = "channel"
    # channels of this group's root fed by channel i of group h: {(h, i): count}
    inputs_from: dict[tuple[int, int], int] = field(default_factory=dict)


def plan(
    model: nn.Module,
    sensitivity: Sensitivity,
    target: Target,
    *,
    implant_fraction: float = 0.1,
    implant: str | None = "pointwise",
    implant_cost: float = 0.25,
    max_layer_ratio: float = 0.95,
    round_to: int = 1,
    allocation: str = "uniform",
    exclude: Sequence[str | nn.Module] | None = None,
    example_inputs: Any = None,
    sign: str = "signed",
    rank_by: str = "score",
    tol: float = 0.01,
) -> PruningPlan:
    """Choose the units to remove and to implant so that the measured pruned model meets ``target``.

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
            friendly shapes (a group narrower than ``round_to`` is left whole).
        allocation: ``"uniform"`` (default): the same ratio in every group, least sensitive units first
            within it; ``"global"``: rank all units of all groups together (the paper's). Uniform is the
            default because it won after fine-tuning in the vision study (docs/results.md): a global
            ranking of per-unit scores ignores what a unit costs, and a residual-stream group (one channel
            shared by every block of a stage) sums its score over all the layers it couples, so global
            ranking keeps those whole and thins a few inner convolutions to a handful of channels, which
            keeps fewer MACs off and fine-tunes no better. See ``rank_by`` for cost-aware global ranking.
        exclude: Layers (names or modules) whose groups must not be touched.
        example_inputs: One input batch; it fixes the input size MACs are counted for and traces the
            graph. Default: the input shape the sensitivity was computed on (recorded in its settings),
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

    Returns:
        The plan, with the achieved parameters and MACs measured on the pruned model.

    Raises:
        ValueError: Bad options, a sensitivity from another model, or a ``flops`` target without an
            input size.
        PlanError: The target is out of reach under the limits (the message gives the most that can be
            removed) or cannot be met within ``tol`` because units are too coarse.
    """
    if not isinstance(target, Target):
        raise ValueError(f"target must be a hap.Target, e.g. Target(params=0.5); got {target!r}")
    if implant is not None and implant not in IMPLANT_KINDS:
        raise ValueError(f"implant must be 'pointwise', 'lowrank' or None, got {implant!r}")
    if not 0.0 <= implant_fraction < 1.0:
        raise ValueError(f"implant_fraction must be in [0, 1), got {implant_fraction}")
    if not implant_cost > 0:
        raise ValueError(f"implant_cost must be > 0, got {implant_cost}")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    if not 0.0 < tol < 0.5:
        raise ValueError(f"tol must be in (0, 0.5), got {tol}")
    sensitivity.ranking_scores(sign)  # validates ``sign`` before any work
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
            with _threads(1), torch.no_grad(), eval_mode(model):
                call_model(model, example_inputs)
        except Exception as e:
            raise ValueError(
                f"the model does not run on a guessed input of shape {tuple(getattr(example_inputs, 'shape', ()))} "
                f"({type(e).__name__}: {first_line(e)}): "
                "pass example_inputs= (one batch of real inputs)"
            ) from e
    spec = input_spec(example_inputs)
    inputs = make_inputs(spec, device=model_device(model))
    # The search runs many batch-1 forward passes; with several threads on a busy machine their
    # synchronisation costs more than the arithmetic (10x measured on 2 shared cores), so use one.
    with _threads(1):
        return _plan(model, sensitivity, target, inputs, spec, implant, implant_fraction, implant_cost,
                     max_layer_ratio, round_to, allocation, exclude, sign, rank_by, tol)


class _threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous value restored after."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.old = 0

    def __enter__(self) -> None:
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def _plan(
    model: nn.Module,
    sensitivity: Sensitivity,
    target: Target,
    inputs: Any,
    spec: dict[str, Any],
    implant: str | None,
    implant_fraction: float,
    implant_cost: float,
    max_layer_ratio: float,
    round_to: int,
    allocation: str,
    exclude: Sequence[str | nn.Module] | None,
    sign: str,
    rank_by: str,
    tol: float,
) -> PruningPlan:
    scores_all = sensitivity.ranking_scores(sign)
    if rank_by == "score_per_param":
        scores_all = scores_all / np.maximum(_unit_weights(model, sensitivity), 1)
    elif rank_by == "layer_normalized":
        scores_all = _layer_normalized(sensitivity, scores_all)
    excluded = _excluded_modules(model, exclude)
    if implant is None or implant_fraction == 0:
        implant = None
    groups, units_by_group = _prepare_groups(model, sensitivity, scores_all, excluded, max_layer_ratio, implant)
    sizes = np.array([len(u) for u in units_by_group])
    base = measure(model, inputs)

    # Nested candidate sets, one unit more per step: step s prunes the first s units of one sequence.
    # "global" orders all units by score; "uniform" by the ratio a unit's group reaches when it goes
    # (the j-th least sensitive of n goes at ratio j/n), then by score, so every prefix keeps all
    # groups within one unit of the same ratio while the search can still stop between ratios.
    def key(gi: int, j: int) -> tuple[float, ...]:
        score = float(scores_all[units_by_group[gi][groups[gi].order[j]]])
        if allocation == "global":
            return (score, gi, j)
        return ((j + 1) / sizes[gi], score, gi)

    entries = sorted((key(gi, j), gi) for gi, g in enumerate(groups) for j in range(g.cap))
    step_group = np.array([gi for _, gi in entries], dtype=np.int64)
    n_steps = len(entries)

    def counts_at(s: int) -> np.ndarray:
        return np.bincount(step_group[:s], minlength=len(groups))

    if n_steps == 0:
        raise PlanError(
            "nothing can be pruned: every group is excluded, has a single channel, or max_layer_ratio allows none"
        )

    cache: dict[int, tuple[float, list[GroupPlan]]] = {0: (0.0, [])}
    built: dict[int, tuple[ModelCost, str]] = {}
    count_kind = {"channels": "channel", "heads": "head"}.get(target.kind)
    if count_kind and not any(g.unit_kind == count_kind for g in groups):
        raise ValueError(
            f"Target({target.kind}=...) needs {count_kind} units, but the sensitivity has none: compute it with "
            f"units={'channels' if count_kind == 'channel' else 'heads'!r} or use Target(params=...)"
        )

    def build(s: int, macs: bool = True) -> tuple[ModelCost, str]:
        """Prune a copy as step ``s`` says and measure it (MACs = -1 when not asked for)."""
        if s not in built or (macs and built[s][0].macs < 0):
            pruned = copy.deepcopy(model)
            apply_groups(pruned, cache[s][1], inputs)
            n_macs = _count_macs_disposable(pruned, inputs) if macs else -1
            built[s] = (ModelCost(count_params(pruned), n_macs), model_signature(pruned))
        return built[s]

    def evaluate(s: int) -> float:
        if s not in cache:
            gps = _materialize(groups, units_by_group, counts_at(s), implant, implant_fraction, implant_cost, round_to)
            cache[s] = (0.0, gps)
            if count_kind:
                frac = _pruned_share(gps, count_kind)
            else:
                cost = build(s, macs=target.kind == "flops")[0]
                frac = 1.0 - (cost.params / base.params if target.kind == "params" else cost.macs / max(1, base.macs))
            cache[s] = (frac, gps)
        return cache[s][0]

    goal = target.value
    top = evaluate(n_steps)
    if top < goal - tol:
        raise PlanError(
            f"target {target} is unreachable: pruning every allowed unit removes only {top:.3f} "
            f"({_limits_text(max_layer_ratio, groups)}); lower the target or relax the limits"
        )
    lo, hi = 0, n_steps
    if top >= goal:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if evaluate(mid) >= goal:
                hi = mid
            else:
                lo = mid
        best = min((s for s in (lo, hi) if s > 0), key=lambda s: (abs(evaluate(s) - goal), s))
    else:
        best = n_steps
    frac, gps = cache[best]
    if abs(frac - goal) > tol:
        lower = evaluate(lo) if lo > 0 else 0.0
        raise PlanError(
            f"target {target} cannot be met within ±{tol}: the nearest plans remove {lower:.4f} and "
            f"{evaluate(hi):.4f} (one more unit is a large step here); use a smaller round_to, a larger tol, "
            "or a nearby target"
        )
    cost, sig = build(best)
    return PruningPlan(
        target=target,
        groups=gps,
        model_signature=sensitivity.model_signature,
        sensitivity_digest=sensitivity.digest(),
        method=sensitivity.method,
        allocation=allocation,
        implant=implant,
        implant_fraction=float(implant_fraction if implant else 0.0),
        inputs=spec,
        base=base.to_dict(),
        achieved=cost.to_dict(),
        pruned_signature=sig,
        settings={
            "max_layer_ratio": max_layer_ratio,
            "round_to": round_to,
            "sign": sign,
            "rank_by": rank_by,
            "tol": tol,
            "implant_cost": implant_cost,
            "exclude": sorted(excluded),
        },
    )


def _limits_text(max_layer_ratio: float, groups: list[_Group]) -> str:
    frozen = sum(1 for g in groups if g.cap == 0)
    return f"max_layer_ratio={max_layer_ratio}, one channel kept per group, {frozen} of {len(groups)} groups frozen"


def _layer_normalized(sens: Sensitivity, scores: np.ndarray) -> np.ndarray:
    """Each group's scores divided by their L2 norm (Michel et al.'s per-layer normalisation).

    Only the global ranking changes: the order inside a group is kept. Layers whose scores are all
    small (e.g. the last layers of a transformer, whose per-head curvature is low) then compete on
    equal terms instead of being emptied first.
    """
    out = scores.astype(np.float64).copy()
    members: dict[str, list[int]] = {}
    for pos, u in enumerate(sens.units):
        members.setdefault(u.group, []).append(pos)
    for idx in members.values():
        norm = float(np.linalg.norm(out[idx]))
        if norm > 0:
            out[idx] /= norm
    return out


def _unit_weights(model: nn.Module, sens: Sensitivity) -> np.ndarray:
    """Weights each unit's removal deletes (all its slices; an element on two slices counted twice)."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    out = np.zeros(len(sens.units))
    for i, u in enumerate(sens.units):
        for s in u.slices:
            shape = shapes[s.param]
            out[i] += len(s.indices) * math.prod(shape) / shape[s.dim]
    return out


def _excluded_modules(model: nn.Module, exclude: Sequence[str | nn.Module] | None) -> set[str]:
    if isinstance(exclude, str | nn.Module):
        exclude = [exclude]
    names = {m: n for n, m in model.named_modules()}
    out: set[str] = set()
    for e in exclude or ():
        if isinstance(e, nn.Module):
            if e not in names:
                raise ValueError(f"exclude holds a {type(e).__name__} that is not part of the model")
            out.add(names[e])
        elif isinstance(e, str) and e in dict(model.named_modules()):
            out.add(e)
        else:
            raise ValueError(f"exclude names a layer {e!r} that the model does not have")
    return out


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _prepare_groups(
    model: nn.Module,
    sens: Sensitivity,
    scores: np.ndarray,
    excluded: set[str],
    max_layer_ratio: float,
    implant: str | None,
) -> tuple[list[_Group], list[list[int]]]:
    """Per group: units (positions into ``sens.units``) by channel, ranking order, limits, implantability."""
    named = dict(model.named_modules())
    by_group: dict[str, dict[int, int]] = {}
    kinds: dict[str, str] = {}
    for pos, u in enumerate(sens.units):
        if u.unit.kind not in ("channel", "head"):
            raise ValueError(f"unit {u.unit.name} is a {u.unit.kind!r} unit: hap.plan plans channels and heads")
        kinds[u.group] = u.unit.kind
        by_group.setdefault(u.group, {})
        if u.index in by_group[u.group]:
            raise ValueError(f"the sensitivity lists unit {u.unit.name} twice: recompute it")
        by_group[u.group][u.index] = pos
    names = list(by_group)
    gindex = {n: i for i, n in enumerate(names)}
    groups: list[_Group] = []
    units_by_group: list[list[int]] = []
    for name in names:
        idx = by_group[name]
        if sorted(idx) != list(range(len(idx))):
            raise ValueError(f"group '{name}' of the sensitivity is missing channels: recompute the sensitivity")
        if name not in named:
            raise ValueError(f"the sensitivity names layer '{name}' that the model lacks: recompute it on this model")
        units = [idx[c] for c in range(len(idx))]
        units_by_group.append(units)
        size = len(units)
        touched = {_module_of(s.param) for p in units for s in sens.units[p].slices}
        frozen = touched & excluded
        cap = 0 if frozen else min(size - 1, math.floor(max_layer_ratio * size + 1e-9))
        order = sorted(range(size), key=lambda c, units=units: (float(scores[units[c]]), c))
        note = f"excluded ({', '.join(sorted(frozen))})" if frozen else ""
        if kinds[name] == "head":
            kind, why = None, ""  # heads are removed outright: there is no cheaper head to implant
        elif implant is None:
            kind, why = None, ""
        else:
            kind, why = _implant_kind(named, name, sens, units, implant)
        if implant is not None and kind is None and why and not note:
            note = f"no implant: {why}"
        g = _Group(name, order, cap, kind, note, unit_kind=kinds[name])
        root = named[name]
        if kind is not None:
            g.kernel_numel = math.prod(root.kernel_size)
            g.in_channels = root.in_channels
            g.pointwise_ok = implant_unsupported_reason(root, "pointwise") is None
        groups.append(g)
    # which channels of which group feed each implantable root (its input width after pruning)
    roots = {f"{g.name}.weight": gi for gi, g in enumerate(groups) if g.kind is not None} if implant else {}
    if roots:
        for u in sens.units:
            for s in u.slices:
                gi = roots.get(s.param)
                if gi is not None and s.role == "in" and s.dim == 1:
                    key = (gindex[u.group], u.index)
                    groups[gi].inputs_from[key] = groups[gi].inputs_from.get(key, 0) + len(s.indices)
    return groups, units_by_group


def _implant_kind(
    named: dict[str, nn.Module], name: str, sens: Sensitivity, units: list[int], implant: str
) -> tuple[str | None, str]:
    """The implant kind group ``name`` can carry (``None`` if none) and, if none, why not."""
    reason = implant_unsupported_reason(named[name], implant)
    if reason is not None:
        return None, f"'{name}': {reason}"
    for p in units:
        for s in sens.units[p].slices:
            mname = _module_of(s.param)
            m = named.get(mname)
            if s.role == "out":
                if mname == name or isinstance(m, _BatchNorm):
                    continue
                if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                    return None, f"several layers produce these channels ('{mname}' too: a residual add)"
                return None, f"the channels pass through '{mname}' ({type(m).__name__})"
            if not (isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1)):
                return None, f"the channels feed '{mname}' ({type(m).__name__}), which cannot be reordered"
    return implant, ""


def _materialize(
    groups: list[_Group],
    units_by_group: list[list[int]],
    counts: np.ndarray,
    implant: str | None,
    implant_fraction: float,
    implant_cost: float,
    round_to: int,
) -> list[GroupPlan]:
    """Group plans for ``counts[g]`` pruned candidates per group (rounding, implant split, ranks)."""
    cands: list[int] = []
    n_imp: list[int] = []
    for g, c in zip(groups, counts, strict=True):
        size = len(g.order)
        c = int(c)
        k = math.floor(implant_fraction * c + 0.5) if (implant is not None and g.kind is not None) else 0
        if c > 0 and round_to > 1:
            # the layer's output width (kept + implanted) is what the consumers see: round it up by
            # removing fewer (the most sensitive of the removed stay)
            width = min(size, math.ceil((size - (c - k)) / round_to) * round_to)
            c = size - width + k
        cands.append(c)
        n_imp.append(k)
    removed_sets = [set(g.order[: c - k]) for g, c, k in zip(groups, cands, n_imp, strict=True)]
    out = []
    for g, c, k in zip(groups, cands, n_imp, strict=True):
        kind, rank, note = (g.kind if k else None), None, g.note
        if kind == "lowrank":
            cin = g.in_channels - sum(n for (h, i), n in g.inputs_from.items() if i in removed_sets[h])
            rank = lowrank_rank(k, cin, g.kernel_numel, implant_cost)
            if rank == 0 and g.pointwise_ok:
                kind, rank = "pointwise", None
                note = "rank 1 costs more than implant_cost for so few channels: pointwise implant"
            elif rank == 0:
                kind, rank, k = None, None, 0
                note = "rank 1 costs more than implant_cost and a 1x1 conv cannot align: removed instead"
        removed = sorted(g.order[: c - k])
        implanted = sorted(g.order[c - k : c])
        kept = sorted(g.order[c:])
        kind = kind if implanted else None
        out.append(GroupPlan(g.name, len(g.order), kept, implanted, removed, kind, rank, note, g.unit_kind))
    return out
