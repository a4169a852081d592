"""Versioned config dataclasses with a JSON round-trip, and the one registry idiom of the library.

Every extensible thing in ``hap`` (criteria, unit families, model zoo entries) is a :class:`Registry`:
registered once by name, listed by name, and an unknown name is a one-line error naming the choices.
Every set of options is a :class:`Config` dataclass: its field defaults are the *only* place a default
is stated (the CLI builds its options from them), ``to_dict``/``from_dict`` round-trip through JSON with a
``version`` check, and an unknown key is an error, never silently ignored (a typo in ``config.json``
would otherwise rerun something else than what the file says).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

__all__ = ["Config", "Registry", "ConfigError", "Problem", "SensitivityConfig", "PlanConfig", "DataOptions"]

T = TypeVar("T")
C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config dict that does not describe the dataclass (unknown key, wrong version, bad value)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One option out of its range: the rule lives in the config's :meth:`Config.problems`, stated once.

    The library raises it as ``"FIELD RULE, got VALUE"``; the CLI says ``"--FLAG VALUE: RULE"``.

    Attributes:
        field: The option, dotted below nested configs (``"plan.round_to"``).
        value: What it was set to.
        rule: What it must be (``"must be an integer >= 1"``).
    """

    field: str
    value: Any
    rule: str

    def under(self, prefix: str) -> Problem:
        return Problem(f"{prefix}.{self.field}", self.value, self.rule)

    def __str__(self) -> str:
        return f"{self.field} {self.rule}, got {self.value!r}"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def in_range(v: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False, integer: bool = False) -> bool:
    """Whether ``v`` is a number (an int if ``integer``) within the bounds: NaN and strings never are."""
    if not _number(v) or (integer and not isinstance(v, int)) or v != v:
        return False
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


@dataclasses.dataclass
class Config:
    """Base of the option dataclasses: ``VERSION``, strict dict round-trip, validated overrides."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (nested configs as dicts, tuples as lists) with ``version``."""
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """Inverse of :meth:`to_dict`; ``version`` may be absent (hand-written files).

        Raises:
            ConfigError: Another version, or a key the dataclass has no field for.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__} needs a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{cls.__name__} version {version!r} is not {cls.VERSION}: re-create the config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no option(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kw = {}
        for k, v in d.items():
            sub = _config_type(hints.get(k))
            kw[k] = sub.from_dict(v) if sub is not None and isinstance(v, Mapping) else _tuple_if(hints.get(k), v)
        return cls(**kw)

    def problems(self) -> list[Problem]:
        """Every option out of its range (nested configs' too, their fields prefixed); ``[]``: all valid.

        The one statement of each rule: the library entry points raise them (:meth:`validate`) before any
        compute, and the CLI prints them with its flag names, so the two cannot disagree.
        """
        out: list[Problem] = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                out += [p.under(f.name) for p in v.problems()]
        return out

    def validate(self: C) -> C:
        """``self`` if :meth:`problems` finds none, else one :class:`ConfigError` naming them all."""
        found = self.problems()
        if found:
            raise ConfigError("; ".join(str(p) for p in found))
        return self

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied; an unknown option name is a :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default value (what the CLI shows and uses when an option is not given)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _config_type(hint: Any) -> type[Config] | None:
    for h in (hint, *typing.get_args(hint)):
        if isinstance(h, type) and issubclass(h, Config):
            return h
    return None


def _tuple_if(hint: Any, v: Any) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(v, list) and (origin is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))):
        return tuple(v)
    return v


class Registry(Generic[T]):
    """Named entries of one kind (``what``), with aliases; lookups of unknown names fail with the choices.

    Args:
        what: What the entries are, for messages ("criterion", "unit family").
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = (), replace: bool = False) -> T:
        """Add ``entry`` under ``name`` (and ``aliases``); re-registering a name needs ``replace=True``."""
        for n in (name, *aliases):
            if not replace and (n in self._entries or n in self._aliases):
                raise ValueError(f"{self.what} {n!r} is already registered (pass replace=True to override it)")
        self._entries[name] = entry
        for a in aliases:
            self._aliases[a] = name
        return entry

    def decorator(self, name: str, **kw: Any) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            return self.register(name, entry, **kw)

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (tests that register toys clean up with this)."""
        name = self.canonical(name)
        self._entries.pop(name)
        for a in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[a]

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (itself or the name an alias points to)."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise ValueError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.names())}")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self, with_aliases: bool = False) -> list[str]:
        out = list(self._entries)
        return out + list(self._aliases) if with_aliases else out

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())


# --------------------------------------------------------------------------------------------------
# the library's option sets (the CLI reads its defaults from these fields)


@dataclasses.dataclass
class SensitivityConfig(Config):
    """How :func:`hap.sensitivity` scores units (every keyword of that function is a field here).

    Attributes:
        units: ``"channels"``, ``"heads"``, or another registered unit family.
        method: A registered criterion (:func:`hap.criteria.names`).
        max_samples, min_samples: Bounds on curvature samples: probe vectors (Hessian; default 32..512) or
            examples (Fisher; default 256..8192). ``None`` picks those defaults per curvature.
        tol: Stop at this median relative standard error of the traces.
        stability: Stop at this split-half rank correlation of the scores (``None``: off).
        samples_per_batch: Probe vectors per visit of a batch (they share its first-order graph).
        max_batches: Distinct batches drawn from the data.
        probe: ``"global"`` or ``"partitioned"`` Hutchinson vectors.
        partitions: Partitions for ``probe="partitioned"``.
        vectors_per_product: Probe vectors batched into one vectorised product.
        curvature: ``"auto"`` (= ``"fisher"``, the measured most stable), ``"fisher"`` or ``"hessian"``.
        backend: HVP backend: ``"auto"``, ``"double_backward"`` or ``"functorch"``.
        scope: ``"all"`` slices removed with a unit enter its score, or only the ``"producer"``'s.
        exclude: Layer names never pruned.
        seed: Seeds every random choice.
        max_seconds: Time budget for the estimate (``None``: none).
        fisher_backend: How Fisher curvature gets per-example squared gradients: ``"vmap"`` (per-example
            gradients, the exact reference), ``"hooks"`` (from layer inputs and output gradients, never
            holding per-example gradients; ``vmap`` for parameters of other layers) or ``"auto"`` (hooks
            when they serve every unit parameter).
    """

    units: str = "channels"
    method: str = "hap"
    max_samples: int | None = None
    min_samples: int | None = None
    tol: float = 0.05
    stability: float | None = 0.95
    samples_per_batch: int = 8
    max_batches: int = 16
    probe: str = "global"
    partitions: int = 4
    vectors_per_product: int = 1
    curvature: str = "auto"
    backend: str = "auto"
    scope: str = "all"
    exclude: tuple[str, ...] = ()
    seed: int = 0
    max_seconds: float | None = None

    def problems(self) -> list[Problem]:
        out = super().problems()
        for name in ("max_samples", "max_batches"):
            v = getattr(self, name)
            if not (v is None and name == "max_samples") and not in_range(v, 1, integer=True):
                out.append(Problem(name, v, "must be an integer >= 1"))
        if self.scope not in SCOPES:
            out.append(Problem("scope", self.scope, f"must be one of {', '.join(SCOPES)}"))
        if self.fisher_backend not in FISHER_BACKENDS:
            out.append(Problem("fisher_backend", self.fisher_backend, f"must be one of {', '.join(FISHER_BACKENDS)}"))
        return out
    fisher_backend: str = "auto"


SCOPES = ("all", "producer")
FISHER_BACKENDS = ("auto", "vmap", "hooks")  # = hap.estimate.fisher.FISHER_BACKENDS (a CLI test keeps them equal)
ALLOCATIONS = ("uniform", "global", "even")
RANKINGS = ("score", "score_per_param", "layer_normalized")
SIGNS = ("signed", "clamp", "abs")
IMPLANT_KINDS = ("pointwise", "lowrank")


@dataclasses.dataclass
class PlanConfig(Config):
    """How :func:`hap.plan` turns scores into a plan (every keyword of that function is a field here).

    Attributes:
        implant: ``"pointwise"`` (the paper's 1x1 conv), ``"lowrank"`` or ``None``.
        implant_fraction: Of each group's pruned units, the most sensitive share implanted instead.
        implant_cost: A ``lowrank`` implant costs at most this share of the filters it replaces.
        max_layer_ratio: At most this share of any group is pruned.
        round_to: Remaining widths are multiples of this; ``"auto"``: the multiple a measured per-layer
            latency table finds free to round up to (:mod:`hap.latency_table`).
        allocation: ``"uniform"`` (same ratio per group; won after fine-tuning in the vision study) or
            ``"global"`` (the paper's ranking across layers) or ``"even"`` (uniform, stopped only where same-size
            groups lost the same number of units: one width per layer kind, for :func:`hap.save_pretrained`).
        exclude: Layer names whose groups stay whole.
        sign: How negative estimates rank: ``"signed"``, ``"clamp"`` or ``"abs"``.
        rank_by: ``"score"``, ``"score_per_param"`` or ``"layer_normalized"``.
        tol: Largest accepted ``|achieved - target|``.
        latency_iters: ``Target(latency=...)``: how many planned models are timed against the dense one (the
            table's plan first, then re-plans for a corrected table target) to bring the *measured* latency to
            the asked one; 0 trusts the table's prediction (nothing timed).
        latency_tol: ``Target(latency=...)``: stop re-planning once the measured kept latency is within this
            relative distance of the asked one (0.05: a plan asked to keep 0.5 may keep 0.475 to 0.525).
    """

    implant: str | None = "pointwise"
    implant_fraction: float = 0.1
    implant_cost: float = 0.25
    max_layer_ratio: float = 0.95
    round_to: int | str = 1
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    sign: str = "signed"
    rank_by: str = "score"
    tol: float = 0.01
    latency_iters: int = 6
    latency_tol: float = 0.05

    def problems(self) -> list[Problem]:
        out = super().problems()
        if self.implant is not None and self.implant not in IMPLANT_KINDS:
            out.append(Problem("implant", self.implant, f"must be {', '.join(IMPLANT_KINDS)} or None"))
        checks = (("implant_fraction", in_range(self.implant_fraction, 0, 1, hi_open=True), "must be in [0, 1)"),
                  ("implant_cost", in_range(self.implant_cost, 0, lo_open=True), "must be > 0"),
                  ("max_layer_ratio", in_range(self.max_layer_ratio, 0, 1, lo_open=True), "must be in (0, 1]"),
                  # "auto" (hap.plan only: the CLI's --round-to takes integers) keeps docs/reliability.md's message
                  ("round_to", self.round_to == "auto" or in_range(self.round_to, 1, integer=True),
                   "must be an integer >= 1"))
        out += [Problem(name, getattr(self, name), rule) for name, ok, rule in checks if not ok]
        for name, choices in (("allocation", ALLOCATIONS), ("rank_by", RANKINGS), ("sign", SIGNS)):
            if getattr(self, name) not in choices:
                out.append(Problem(name, getattr(self, name), f"must be one of {', '.join(choices)}"))
        if not in_range(self.tol, 0, 0.5, lo_open=True, hi_open=True):
            out.append(Problem("tol", self.tol, "must be in (0, 0.5)"))
        if not in_range(self.latency_iters, 0, integer=True):
            out.append(Problem("latency_iters", self.latency_iters, "must be an integer >= 0"))
        if not in_range(self.latency_tol, 0, 0.5, lo_open=True, hi_open=True):
            out.append(Problem("latency_tol", self.latency_tol, "must be in (0, 0.5)"))
        return out


@dataclasses.dataclass
class DataOptions(Config):
    """How a run reads its data, per unit family: what ``RunConfig.data_options`` holds (a dict there:
    :func:`hap.pipeline.run` is handed the data itself and never reads it); each family reads its own fields.

    Stated here, with the library's other option sets, because the library reads it as well as the CLI: the
    CLI builds its data flags from these defaults and loads a run's data with them (:mod:`hap.cli.sources`,
    which re-exports it), and :func:`hap.text.run.load_run_data` rebuilds a saved text run's splits from the
    same record.

    Attributes:
        data_root: Images: folder holding the dataset files, if not the default.
        subset: Images: use only N training images (quick runs).
        text_column, label_column: Text CSV: headers of the texts and labels (default: text, label, ...).
        classes: Text: labels to keep, in id order (tweets default: negative, positive).
        balance: Text: down-sample classes to the smallest (``None``: on for tweets, off for a CSV).
        train_size, val_size, score_size, test_size: Text: at most this many texts per split.
        new_head: Text: replace a trained classification head by a new one for these labels.
        task: Text: ``auto`` (read from the model directory's config.json, :func:`hap.cli.sources.detect_task`),
            ``classification`` or ``causal-lm`` (next-token loss, perplexity; labels ignored, texts packed
            into ``max_length``-token sequences, :mod:`hap.text.lm_data`). A run records the resolved one.
    """

    data_root: str | None = None
    subset: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = None
    balance: bool | None = None
    train_size: int = 4000
    val_size: int = 500
    score_size: int = 512
    test_size: int = 1000
    new_head: bool = False
    task: str = "auto"
