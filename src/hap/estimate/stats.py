"""Statistics of an estimate: running per-sample records, standard errors, split-half rank stability.

This is where every estimator's evidence is summarised, so it is also the one place a sharded
(multi-process) estimate would have to combine its records.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["spearman", "SampleStats"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return float("nan")
    ra = _rankdata(a)
    rb = _rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _rankdata(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    # average the ranks of ties so that constant runs do not look ordered
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


class SampleStats:
    """Running record of per-sample per-unit estimates; NaN marks units a sample did not cover."""

    def __init__(self, num_units: int) -> None:
        self.rows: list[np.ndarray] = []
        self.num_units = num_units

    def add(self, row: np.ndarray) -> None:
        self.rows.append(row)

    def matrix(self) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.full((0, self.num_units), np.nan)

    def summary(self, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        m = self.matrix()
        count = np.sum(~np.isnan(m), axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nanmean(m, axis=0) if m.shape[0] else np.full(self.num_units, np.nan)
            var = np.nanvar(m, axis=0, ddof=1) if m.shape[0] > 1 else np.full(self.num_units, np.inf)
            se = np.sqrt(var / np.maximum(count, 1))
            rel = np.abs(se / mean)
            rel = rel[np.isfinite(rel)]
            med_rel = float(np.median(rel)) if rel.size else float("inf")
        # Split halves per unit (each unit's own k-th sample, so partitioned probes split evenly too).
        w = np.ones(self.num_units) if weight is None else weight
        half_a = np.full(self.num_units, np.nan)
        half_b = np.full(self.num_units, np.nan)
        if m.shape[0] >= 2:
            valid = ~np.isnan(m)
            order = np.cumsum(valid, axis=0) - 1  # per-unit index of each sample
            even = valid & (order % 2 == 0)
            odd = valid & (order % 2 == 1)
            with np.errstate(invalid="ignore"):
                half_a = np.where(even, m, 0).sum(0) / np.maximum(even.sum(0), 1)
                half_b = np.where(odd, m, 0).sum(0) / np.maximum(odd.sum(0), 1)
        split = spearman(half_a * w, half_b * w) if m.shape[0] >= 2 else float("nan")
        return mean, se, count, split, med_rel
