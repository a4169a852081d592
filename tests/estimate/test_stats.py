"""SampleStats: its running sums give the same bits as the column sums of the whole sample matrix."""

from __future__ import annotations

import numpy as np
import pytest

from hap.estimate.stats import SampleStats, spearman


def _from_scratch(m: np.ndarray, weight: np.ndarray):
    """The summary recomputed from the full matrix (each unit's own even / odd samples for the halves)."""
    valid = ~np.isnan(m)
    vals = np.where(valid, m, 0.0)
    order = np.cumsum(valid, axis=0) - 1
    even, odd = valid & (order % 2 == 0), valid & (order % 2 == 1)
    count = valid.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, vals.sum(0) / np.maximum(count, 1), np.nan)
        dev = np.where(valid, m - mean, 0.0)
        var = np.where(count > 1, (dev * dev).sum(0) / (count - 1), np.nan)
        var = var if len(m) > 1 else np.full(m.shape[1], np.inf)
        se = np.sqrt(var / np.maximum(count, 1))
        rel = np.abs(se / mean)
    rel = rel[np.isfinite(rel)]
    half_a = np.where(even, m, 0).sum(0) / np.maximum(even.sum(0), 1)
    half_b = np.where(odd, m, 0).sum(0) / np.maximum(odd.sum(0), 1)
    split = spearman(half_a * weight, half_b * weight) if len(m) >= 2 else float("nan")
    return mean, se, count.astype(np.int64), split, float(np.median(rel)) if rel.size else float("inf")


@pytest.mark.parametrize("nan_fraction", [0.0, 0.4, 0.95])
def test_summary_is_bitwise_the_whole_matrix_summary(nan_fraction):
    rng = np.random.default_rng(0)
    units = 37
    stats = SampleStats(units)
    rows = []
    for i in range(70):
        row = rng.standard_normal(units) * rng.exponential(1.0, units) + 0.2
        row[rng.random(units) < nan_fraction] = np.nan  # units a partitioned probe skipped
        if i == 0:
            row[:3] = -0.0
        stats.add(row)
        rows.append(row)
        assert len(stats) == i + 1
        if i in (0, 1, 2, 17, 69):
            weight = rng.random(units)
            want = _from_scratch(np.stack(rows), weight)
            got = stats.summary(weight)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(stats.matrix(), np.stack(rows))
    assert stats.matrix() is not stats.matrix()  # a copy: the caller may keep it while sampling goes on


def test_empty_stats():
    stats = SampleStats(4)
    assert stats.matrix().shape == (0, 4) and len(stats) == 0
