"""A per-layer latency table as data: lookups, interpolation between measured widths, the width multiple.

Pure data, no timing: :mod:`hap.latency_table` measures the table (once per machine, thread count, torch
version, batch and input size, cached as JSON) and walks a model to read its layers' widths; this module
only answers "how long does this layer take at these widths" and "which width multiple is free".

A layer's entry is a grid: its time measured at a few input widths x output widths (each a share of the
dense width, plus width 1), interpolated bilinearly in between, clamped outside. The grid is first fitted
by isotonic regression (least squares, non-decreasing) along each axis: the search bisects on the predicted
latency, so a timing dip (noise, or a kernel that happens to suit one width) must not make the prediction
fall when a layer gets wider; a running maximum would instead carry one noisy spike to every wider point.
A separate *sweep* keeps every width of the top of the range,
unsmoothed, for :meth:`LatencyTable.auto_round_to`: if rounding a width up to the next multiple of ``m``
costs (almost) nothing, widths are only worth removing ``m`` at a time.

The time of everything else in the forward (BatchNorm, activations, residual adds, pooling) is the dense
model's measured total minus its layers' sum (``rest_ms``). Those are element-wise passes over the
layers' outputs, so the prediction scales it by the share of output elements (channels x positions) the
pruned model still produces.

The prediction is still only a model of the stopwatch (per-layer times do not add up exactly: framework
overhead, caches shared between layers), so :func:`hap.plan` closes the loop: it times the planned model,
and :func:`next_internal_target` says which table target to plan for next so that the *measured* latency
lands on the asked one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["LayerLatency", "LatencyTable", "LayerUse", "interp2", "isotonic", "next_internal_target", "TABLE_VERSION",
           "ROUND_TO_CHOICES"]

TABLE_VERSION = 1
ROUND_TO_CHOICES = (1, 2, 4, 8, 16, 32)


def isotonic(y: Sequence[float]) -> np.ndarray:
    """The non-decreasing sequence nearest ``y`` in least squares (pool-adjacent-violators).

    Written here because numpy has none and scikit-learn / SciPy are not dependencies; the algorithm is
    the textbook one: merge neighbouring blocks into their mean while a block's mean exceeds the next's.
    """
    means: list[float] = []
    sizes: list[int] = []
    for v in y:
        means.append(float(v))
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            n = sizes[-2] + sizes[-1]
            means[-2] = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / n
            sizes[-2] = n
            means.pop()
            sizes.pop()
    return np.repeat(means, sizes)


def interp2(xs: Sequence[float], ys: Sequence[float], grid: np.ndarray, x: float, y: float) -> float:
    """Bilinear interpolation of ``grid[i, j]`` (measured at ``xs[i]``, ``ys[j]``) at ``(x, y)``.

    Exact at the measured points, linear along each axis in between, clamped outside the measured range
    (a width below the smallest measured one costs at least as much as that one: overhead dominates there).
    A single-point axis is constant.
    """
    g = np.asarray(grid, dtype=np.float64)
    rows = [float(np.interp(y, ys, g[i])) for i in range(len(xs))]
    return float(np.interp(x, xs, rows))


@dataclass
class LayerLatency:
    """One layer shape's measured times (milliseconds per forward of the whole batch).

    Attributes:
        in_widths: Input widths measured (ascending).
        out_widths: Output widths measured (ascending).
        ms: ``ms[i][j]``: time at ``in_widths[i]`` x ``out_widths[j]``, as measured (medians).
        in_full: The dense input width.
        out_full: The dense output width.
        positions: Output positions per example (``H*W`` of a conv's output; 1 for a Linear on vectors).
        weights_per_pair: Multiply-adds per output position per (input, output) channel pair
            (``k*k`` of a conv), to cost layers the table lacks (implants) from this one.
        sweep_widths: Output widths of the fine sweep (every width of the top of the range).
        sweep_ms: Times of the sweep, the input width scaled with the output width.
    """

    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]
    in_full: int
    out_full: int
    positions: int = 1
    weights_per_pair: int = 1
    sweep_widths: list[int] = field(default_factory=list)
    sweep_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = np.asarray(self.ms, dtype=np.float64)
        if g.shape != (len(self.in_widths), len(self.out_widths)) or g.size == 0 or not np.isfinite(g).all():
            raise ValueError(f"a layer's latency grid must be {len(self.in_widths)} x {len(self.out_widths)} finite "
                             "times: re-measure the table")
        if list(self.in_widths) != sorted(set(self.in_widths)) or list(self.out_widths) != sorted(set(self.out_widths)):
            raise ValueError("a layer's measured widths must be strictly ascending: re-measure the table")
        # non-decreasing along both axes: a wider layer never predicts faster (see the module docstring); the
        # isotonic fit is order-preserving, so fitting the columns keeps the rows fitted first non-decreasing
        rows = np.stack([isotonic(r) for r in g])
        self._grid = np.stack([isotonic(c) for c in rows.T]).T

    def lookup(self, cin: float, cout: float) -> float:
        """Milliseconds at ``cin`` x ``cout`` channels (interpolated on the monotone grid)."""
        return interp2(self.in_widths, self.out_widths, self._grid, cin, cout)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerLatency:
        return cls(in_widths=[int(w) for w in d["in_widths"]], out_widths=[int(w) for w in d["out_widths"]],
                   ms=[[float(t) for t in row] for row in d["ms"]], in_full=int(d["in_full"]),
                   out_full=int(d["out_full"]), positions=int(d.get("positions", 1)),
                   weights_per_pair=int(d.get("weights_per_pair", 1)),
                   sweep_widths=[int(w) for w in d.get("sweep_widths", [])],
                   sweep_ms=[float(t) for t in d.get("sweep_ms", [])])


@dataclass(frozen=True)
class LayerUse:
    """One layer of a (pruned) model as the prediction sees it.

    Attributes:
        key: The table entry of the dense layer it came from.
        cin: Its input width now.
        cout: Its output width now.
        extra_macs_per_position: Multiply-adds per output position of layers the table lacks that belong
            to this one (a Neural Implant beside a kept convolution), costed at this layer's rate.
        extra_out: Output channels those layers add (their outputs are concatenated to this one's).
        extra_calls: How many layer calls those are (each pays the per-call cost of a tiny layer).
    """

    key: str
    cin: int
    cout: int
    extra_macs_per_position: int = 0
    extra_out: int = 0
    extra_calls: int = 0


@dataclass
class LatencyTable:
    """Per-layer latency of one model on one machine, for one batch and input size.

    Attributes:
        meta: What the times depend on (machine, cores, threads, torch version, batch, input shape): the
            cache key; a table is only valid where ``meta`` matches.
        layers: Per layer-shape key (:func:`hap.latency_table.layer_key`), its measured grid.
        counts: How many layers of the model have each key.
        dense_ms: The dense model's measured forward time.
        rest_ms: ``dense_ms`` minus the sum of its layers' table times, at least 0.
        settings: How it was measured (repeats, grid shares), for a reader.
        version: Format version.
    """

    meta: dict[str, Any]
    layers: dict[str, LayerLatency]
    counts: dict[str, int]
    dense_ms: float
    rest_ms: float
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = TABLE_VERSION

    def layer_ms(self, use: LayerUse) -> float:
        """Predicted milliseconds of one layer (and the implant beside it)."""
        entry = self.layers.get(use.key)
        if entry is None:
            raise ValueError(f"the latency table has no layer {use.key}: it was measured for another model or "
                             "input size; measure one for this model (hap.latency_table.measure_table)")
        ms = entry.lookup(use.cin, use.cout)
        if use.extra_macs_per_position:
            # An implant is costed from this layer's entry (it reads the same input): per call, the fixed cost
            # of the narrowest measured layer (a width-1 call is all overhead), plus the variable time of this
            # layer at the implant's widths scaled by their multiply-adds; a tiny layer is mostly overhead.
            fixed = entry.lookup(1, 1)
            pair = max(1, use.cin * max(1, use.extra_out) * entry.weights_per_pair)
            variable = max(0.0, entry.lookup(use.cin, max(1, use.extra_out)) - fixed)
            ms += max(1, use.extra_calls) * fixed + variable * use.extra_macs_per_position / pair
        return ms

    def predict(self, uses: Iterable[LayerUse]) -> float:
        """Predicted milliseconds of a model whose table layers are ``uses``: their sum plus the rest, scaled
        by the share of output elements still produced (an implanted layer's concatenation writes its whole
        output once more, so it counts twice)."""
        uses = list(uses)
        total = sum(self.layer_ms(u) for u in uses)
        dense_elems = sum(e.out_full * e.positions * self.counts.get(k, 1) for k, e in self.layers.items())
        elems = sum((u.cout + u.extra_out) * self.layers[u.key].positions * (2 if u.extra_out else 1) for u in uses)
        return total + self.rest_ms * (elems / max(1, dense_elems))

    def dense_uses(self) -> list[LayerUse]:
        """The dense model's layers (each key ``counts`` times at full width)."""
        return [LayerUse(k, e.in_full, e.out_full) for k, e in self.layers.items()
                for _ in range(self.counts.get(k, 1))]

    def auto_round_to(self, choices: Sequence[int] = ROUND_TO_CHOICES,
                      free: float = 0.03) -> tuple[int, dict[int, float]]:
        """The largest width multiple ``m`` for which rounding widths up to a multiple of ``m`` is free.

        For each ``m``: the mean, over the swept widths ``w`` of every layer (weighted by the layer's dense
        time and count), of ``time(ceil_m(w)) / time(w)``; when per-layer latency steps down at multiples of
        ``m`` (blocked vector kernels), the widths in between cost as much as the next multiple, and that
        ratio is about 1. ``m`` is kept if its cost is at most ``1 + free``.

        Returns:
            ``(m, {m: cost})``; ``1`` when no multiple is free or nothing was swept.
        """
        costs: dict[int, float] = {}
        for m in choices:
            num = den = 0.0
            for k, e in self.layers.items():
                t = dict(zip(e.sweep_widths, e.sweep_ms, strict=True))
                if len(t) < 2:
                    continue
                weight = self.counts.get(k, 1) * max(e.sweep_ms)
                ratios = [t[math.ceil(w / m) * m] / t[w] for w in t if math.ceil(w / m) * m in t and t[w] > 0]
                if ratios:
                    num += weight * float(np.mean(ratios))
                    den += weight
            if den > 0:
                costs[m] = num / den
        best = max((m for m, c in costs.items() if c <= 1.0 + free), default=1)
        return best, costs

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "meta": dict(self.meta), "dense_ms": self.dense_ms, "rest_ms": self.rest_ms,
                "counts": dict(self.counts), "settings": dict(self.settings),
                "layers": {k: e.to_dict() for k, e in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: Another format version or a malformed table.
        """
        if not isinstance(d, Mapping) or d.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table format {d.get('version') if isinstance(d, Mapping) else None!r} is not "
                             f"{TABLE_VERSION}: re-measure it")
        try:
            return cls(meta=dict(d["meta"]), layers={str(k): LayerLatency.from_dict(v) for k, v in d["layers"].items()},
                       counts={str(k): int(v) for k, v in d["counts"].items()}, dense_ms=float(d["dense_ms"]),
                       rest_ms=float(d["rest_ms"]), settings=dict(d.get("settings", {})), version=int(d["version"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed latency table ({type(e).__name__}: {e}): re-measure it") from e


def next_internal_target(points: Sequence[tuple[float, float]], asked_kept: float, cap: float) -> float:
    """The table target (fraction of the *predicted* latency removed) to plan for next, so that the *measured*
    kept latency comes to ``asked_kept``: regula falsi on measured kept against predicted removed.

    The measured kept fraction falls as the predicted removal grows, but not one for one (the table predicts
    more speed-up than a network shows), so the planner inverts the measured curve instead of trusting the
    table. With a plan on each side of the asked value, the next target is the secant root between the two
    nearest to it (the bracket only shrinks); with every plan too slow, the secant through the two most
    aggressive ones is extrapolated; a flat or rising secant (measurement noise, or per-call overhead that
    pruning does not remove) gives no direction, so the most aggressive plan allowed is tried next, which
    settles whether the target is reachable at all.

    Args:
        points: ``(predicted fraction removed, measured kept fraction)`` of every plan timed so far; the dense
            model ``(0, 1)`` is implied (kept 1 by definition) and need not be given.
        asked_kept: The kept latency asked for (``1 - Target.latency``), in (0, 1).
        cap: The largest table target allowed (the most aggressive plan's predicted removal, at most 0.99).

    Returns:
        The next table target, clamped to ``[0, cap]``.
    """
    cap = min(max(float(cap), 0.0), 0.99)
    pts = sorted({(0.0, 1.0), *((float(x), float(k)) for x, k in points)})
    slow = [p for p in pts if p[1] > asked_kept]  # the dense anchor is always here: asked_kept < 1
    fast = [p for p in pts if p[1] <= asked_kept and p[0] > 0]
    if fast:
        hi = min(fast)  # the least aggressive plan that is fast enough
        lo = max(p for p in slow if p[0] < hi[0])  # the most aggressive one below it that is too slow
        x = lo[0] + (lo[1] - asked_kept) * (hi[0] - lo[0]) / (lo[1] - hi[1])
    elif len(slow) < 2 or slow[-1][0] <= slow[-2][0]:
        x = cap  # one point, or two at one prediction: no slope to follow
    else:
        (x1, k1), (x2, k2) = slow[-2:]
        slope = (k2 - k1) / (x2 - x1)  # measured kept per unit of predicted removal (the table's own is -1)
        x = cap if slope >= -1e-3 else x2 + (asked_kept - k2) / slope
    return min(max(x, 0.0), cap)
