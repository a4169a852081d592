"""The per-layer latency table as data: exact interpolation and isotonic fit on synthetic tables, the
prediction's sum, round_to="auto" on synthetic staircases, and the CLI's latency target."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from hap.planning.latency import LatencyTable, LayerLatency, LayerUse, interp2, isotonic


def _bilinear(cin: float, cout: float) -> float:
    return 1.0 + 0.5 * cin + 0.25 * cout + 0.01 * cin * cout


def test_interpolation_is_exact_for_a_bilinear_table_and_clamps_outside():
    ins, outs = [1, 4, 8, 16], [1, 2, 8, 16]
    e = LayerLatency(ins, outs, [[_bilinear(i, o) for o in outs] for i in ins], 16, 16)
    for i, o in itertools.product(ins, outs):  # the measured points
        assert e.lookup(i, o) == pytest.approx(_bilinear(i, o), rel=1e-12)
    for i, o in [(2.5, 5.0), (6, 1.5), (12, 12), (9, 3)]:  # bilinear is exact for a bilinear function
        assert e.lookup(i, o) == pytest.approx(_bilinear(i, o), rel=1e-12)
    assert e.lookup(40, 40) == pytest.approx(_bilinear(16, 16)) and e.lookup(0, 0) == pytest.approx(_bilinear(1, 1))
    assert interp2([3], [1, 2], np.array([[5.0, 7.0]]), 10, 1.5) == pytest.approx(6.0)  # one-point axis: constant


def test_isotonic_fit_matches_the_min_max_formula_and_keeps_rows_monotone():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.normal(size=7)
        ref = [max(min(y[j:k + 1].mean() for k in range(i, 7)) for j in range(i + 1)) for i in range(7)]
        assert np.allclose(isotonic(y), ref)
    g = rng.uniform(1, 2, size=(4, 5))
    e = LayerLatency([1, 2, 3, 4], [1, 2, 3, 4, 5], g.tolist(), 4, 5)
    fit = np.array([[e.lookup(i, o) for o in range(1, 6)] for i in range(1, 5)])
    assert (np.diff(fit, axis=0) >= -1e-12).all() and (np.diff(fit, axis=1) >= -1e-12).all()


def _table(sweep_step: int = 0) -> LatencyTable:
    ws = [1, 4, 8, 16]
    sweep = list(range(8, 17))
    sweep_ms = [float(math.ceil(w / sweep_step)) if sweep_step else float(w) for w in sweep]
    a = LayerLatency(ws, ws, [[i * o * 0.01 for o in ws] for i in ws], 16, 16, positions=4, weights_per_pair=9,
                     sweep_widths=sweep, sweep_ms=sweep_ms)
    b = LayerLatency([16], [1, 10], [[0.1, 1.0]], 16, 10, positions=1)
    return LatencyTable(meta={}, layers={"a": a, "b": b}, counts={"a": 2, "b": 1}, dense_ms=0.0, rest_ms=3.0)


def test_prediction_sums_layers_and_scales_the_rest_by_output_elements():
    t = _table()
    dense = t.predict(t.dense_uses())
    assert dense == pytest.approx(2 * 16 * 16 * 0.01 + 1.0 + 3.0)
    uses = [LayerUse("a", 16, 8), LayerUse("a", 8, 16), LayerUse("b", 16, 10)]
    elems = (8 * 4 + 16 * 4 + 10) / (2 * 16 * 4 + 10)
    assert t.predict(uses) == pytest.approx(16 * 8 * 0.01 * 2 + 1.0 + 3.0 * elems)
    # an implant beside a kept conv: a fixed cost per call (the 1x1 entry) and the variable rest of the kept
    # layer's time at the implant's widths, scaled by multiply-adds; its concatenation doubles its elements
    imp = LayerUse("a", 8, 4, extra_macs_per_position=8 * 4, extra_out=4, extra_calls=1)
    fixed = 0.01
    assert t.layer_ms(imp) == pytest.approx(8 * 4 * 0.01 + fixed + (8 * 4 * 0.01 - fixed) * (8 * 4) / (8 * 4 * 9))
    with_imp = [LayerUse("a", 16, 4, 16 * 4, 4, 1), LayerUse("a", 8, 16), LayerUse("b", 16, 10)]
    elems = ((4 + 4) * 4 * 2 + 16 * 4 + 10) / (2 * 16 * 4 + 10)
    assert t.predict(with_imp) == pytest.approx(sum(t.layer_ms(u) for u in with_imp) + 3.0 * elems)
    with pytest.raises(ValueError, match="no layer c: it was measured for another model"):
        t.predict([LayerUse("c", 1, 1)])
    again = LatencyTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again.predict(uses) == pytest.approx(t.predict(uses))


@pytest.mark.parametrize(("step", "expected"), [(0, 1), (4, 4), (8, 8)])
def test_auto_round_to_finds_the_staircase_step(step, expected):
    chosen, costs = _table(step).auto_round_to()
    assert chosen == expected and costs[1] == pytest.approx(1.0)
    if step:
        assert costs[step] == pytest.approx(1.0) and costs[2 * step] > 1.03


def test_cli_target_parser_accepts_latency_for_channels():
    from hap.cli.common import parse_target
    from hap.cli.sources import TARGETS

    assert parse_target("latency=0.5", TARGETS["channels"]) == {"latency": 0.5}
