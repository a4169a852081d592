"""Statistics of an estimate: running per-sample records, standard errors, split-half rank stability.

This is where every estimator's evidence is summarised, so it is also the one place a sharded
(multi-process) estimate combines its records (:class:`SampleStats`).
"""

from __future__ import annotations

import math

import numpy as np

from ..distributed import all_reduce_sum

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
    """Running record of per-sample per-unit estimates; NaN marks units a sample did not cover.

    Under ``torch.distributed`` each rank records its own samples and :meth:`summary` combines the ranks
    exactly: counts and sums are added across ranks, then the squared deviations from the *global* mean
    (a second, numerically safe pass), then the sums and counts of each unit's even and odd samples, so
    the means, standard errors and split halves are those of the union of all ranks' samples (each rank's
    samples alternate between the halves in its own order). Every rank must call :meth:`summary` at the
    same points.
    """

    def __init__(self, num_units: int) -> None:
        self.num_units = num_units
        self._buf = np.empty((0, num_units))
        self._n = 0
        # Running per-unit sums, in row order, so that :meth:`summary` (called after every batch visit by
        # the stopping rule) need not rebuild them from all rows each time: the same additions in the same
        # order as the column sums of the whole matrix, so the same bits.
        self._count = np.zeros(num_units, dtype=np.int64)
        self._total = np.zeros(num_units)
        self._n_half = [np.zeros(num_units, dtype=np.int64), np.zeros(num_units, dtype=np.int64)]
        self._s_half = [np.zeros(num_units), np.zeros(num_units)]

    def add(self, row: np.ndarray) -> None:
        row = np.asarray(row, dtype=np.float64)
        if self._n == len(self._buf):  # grow by doubling: amortised O(1) per row, no re-stacking
            grown = np.empty((max(16, 2 * len(self._buf)), self.num_units))
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n] = row
        self._n += 1
        valid = ~np.isnan(row)
        even = valid & (self._count % 2 == 0)  # this unit's own sample index is even
        odd = valid & ~even
        self._count += valid
        self._total += np.where(valid, row, 0.0)
        self._n_half[0] += even
        self._n_half[1] += odd
        self._s_half[0] += np.where(even, row, 0)
        self._s_half[1] += np.where(odd, row, 0)

    def __len__(self) -> int:
        return self._n

    def matrix(self) -> np.ndarray:
        return self._buf[: self._n].copy() if self._n else np.full((0, self.num_units), np.nan)

    def summary(self, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """``(mean, se, count, split_half, median_rel_se)`` over every rank's samples."""
        m = self._buf[: self._n]
        first = np.stack([
            self._count, self._total, self._n_half[0], self._s_half[0], self._n_half[1], self._s_half[1],
            np.full(self.num_units, float(self._n)),
        ]).astype(np.float64)
        count, total, n_even, s_even, n_odd, s_odd, rows_all = all_reduce_sum(first)
        rows = int(rows_all[0]) if self.num_units else 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            dev = m - mean
            dev = np.where(np.isnan(m), 0.0, dev)
            m2 = all_reduce_sum((dev * dev).sum(0))
            var = np.where(count > 1, m2 / (count - 1), np.nan) if rows > 1 else np.full(self.num_units, np.inf)
            se = np.sqrt(var / np.maximum(count, 1))
            rel = np.abs(se / mean)
            rel = rel[np.isfinite(rel)]
            med_rel = float(np.median(rel)) if rel.size else float("inf")
        # Split halves per unit (each unit's own k-th sample, so partitioned probes split evenly too).
        w = np.ones(self.num_units) if weight is None else weight
        half_a = s_even / np.maximum(n_even, 1)
        half_b = s_odd / np.maximum(n_odd, 1)
        split = spearman(half_a * w, half_b * w) if rows >= 2 else float("nan")
        return mean, se, count.astype(np.int64), split, med_rel
