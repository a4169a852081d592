"""Plans as data: :class:`Target`, :class:`GroupPlan`, :class:`PruningPlan` (``plan.json``), example-input specs.

Nothing here imports model, surgery or estimator code: a plan can be read, checked and summarised
without torch models, and every module downstream (surgery, io, reports) depends on this one only.

A :class:`Target` is a fraction of the model to remove: of its parameters, of its MACs (for a given
input size), of its prunable channels (the reference code's convention) or of its attention heads.
A :class:`PruningPlan` lists, per group, kept / implanted / removed unit indices, and records the target,
what was achieved, where the scores came from (method and content hash of the sensitivity) and which
architecture it applies to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._utils import atomic_write_text, first_line
from ..config import IMPLANT_KINDS

__all__ = ["Target", "GroupPlan", "PruningPlan", "PlanError", "TARGET_KINDS", "input_spec", "make_inputs",
           "pruned_share", "sequence_length"]

FORMAT_VERSION = 1
TARGET_KINDS = ("params", "flops", "channels", "heads", "latency")


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
        latency: Fraction of the dense model's CPU latency removed (0.5: twice as fast) at the batch size of
            a per-layer latency table measured on this machine (:mod:`hap.latency_table`): planned on the
            table's prediction, then timed and re-planned until measured (``PlanConfig.latency_iters``).
    """

    params: float | None = None
    flops: float | None = None
    channels: float | None = None
    heads: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        given = [(k, getattr(self, k)) for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            names = ", ".join(k for k, _ in given) or "none"
            raise ValueError(
                f"a Target needs exactly one of params=, flops=, channels=, heads=, latency= (got {names})"
            )
        k, v = given[0]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0.0 < v < 1.0:
            raise ValueError(
                f"Target({k}={v!r}) must be a fraction strictly between 0 and 1: the share of the model to remove"
            )
        object.__setattr__(self, k, float(v))

    @property
    def kind(self) -> str:
        """``"params"``, ``"flops"``, ``"channels"``, ``"heads"`` or ``"latency"``."""
        return next(k for k in TARGET_KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def to_dict(self) -> dict[str, float]:
        return {self.kind: self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        unknown = set(d) - set(TARGET_KINDS)
        if unknown:
            raise ValueError(
                f"unknown target field(s) {sorted(unknown)}: use params, flops, channels, heads or latency"
            )
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
        return pruned_share(self.groups, "channel")

    @property
    def heads_removed(self) -> float:
        """Fraction of attention heads removed."""
        return pruned_share(self.groups, "head")

    @property
    def neurons_removed(self) -> float:
        """Fraction of feed-forward neurons removed."""
        return pruned_share(self.groups, "neuron")

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
        if kind == "latency" and "latency" in self.settings:
            lat = self.settings["latency"]
            if "measured_kept" in lat:  # planned in a closed loop: what the stopwatch saw, not the table
                return 1.0 - float(lat["measured_kept"])
            return 1.0 - float(lat["predicted_ms"]) / float(lat["dense_ms"])
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
            f", {k} {pruned_share(self.groups, kind):.4f}"
            for k, kind in (("channels", "channel"), ("heads", "head"), ("neurons", "neuron"))
            if any(g.kind == kind for g in self.groups)
        )
        tokens = sequence_length(self.inputs)
        rows.append(
            f"target {self.target}; removed params {self.params_removed:.4f}, MACs {self.macs_removed:.4f}{shares} "
            f"({self.base['params']} -> {self.achieved['params']} params, "
            f"{self.base['macs']} -> {self.achieved['macs']} MACs per example"
            + (f" of {tokens} tokens)" if tokens is not None else ")")
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
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as e:
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
        except ValueError as e:  # the message names the file: a run directory holds several
            raise ValueError(f"'{p}' is {first_line(e)}") from e


def pruned_share(groups: Sequence[GroupPlan], kind: str) -> float:
    total = sum(g.size for g in groups if g.kind == kind)
    return sum(len(g.removed) + len(g.implanted) for g in groups if g.kind == kind) / max(1, total)


def sequence_length(spec: Mapping[str, Any]) -> int | None:
    """Tokens per example of a token-id input spec (``input_ids``, else the first integer ``[1, T]``
    tensor), or ``None`` for other inputs: MACs of a transformer are only meaningful with it stated."""
    def token_len(s: Any) -> int | None:
        if isinstance(s, Mapping) and "shape" in s and len(s["shape"]) == 2:
            dtype = getattr(torch, str(s.get("dtype")), None)
            if isinstance(dtype, torch.dtype) and not dtype.is_floating_point and dtype != torch.bool:
                return int(s["shape"][1])
        return None

    if "kwargs" in spec:
        kw = spec["kwargs"]
        first = token_len(kw.get("input_ids"))
        return first if first is not None else next((t for v in kw.values() if (t := token_len(v)) is not None), None)
    if "args" in spec:
        return next((t for v in spec["args"] if (t := token_len(v)) is not None), None)
    return token_len(spec)


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
