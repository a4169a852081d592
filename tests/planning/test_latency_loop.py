"""The closed latency loop: a latency target is met by the *measured* latency, not the table's prediction.

The stopwatch is replaced by a deterministic latency model that disagrees with the table the way real
networks do (more time per layer, plus per-call overhead that pruning does not remove):
``measured = 1.3 * predicted + overhead``. The table's own plan then misses the asked latency, and the loop
must correct it; every number asserted is recomputed from that model on the returned plan.
"""

from __future__ import annotations

import json
import re

import pytest

import hap
import hap.planner as planner
from hap.config import PlanConfig
from hap.latency_table import predict_ms
from hap.planning.latency import next_internal_target

from .._latency_helpers import synthetic_for, tiny

SCALE = 1.3


def _setup(overhead: float = 0.5, batch: int = 1, threads: int = 1):
    """Tiny net, its synthetic table (stating the batch and threads to time at) and the fake stopwatch."""
    model, x, sens = tiny()
    table = synthetic_for(model, x)
    table.meta = {"batch": batch, "threads": threads}
    dense_pred = table.predict(table.dense_uses())
    calls: list[tuple[int, int]] = []

    def fake(dense, pruned, inputs, b, t):
        calls.append((b, t))
        return SCALE * dense_pred + overhead * dense_pred, SCALE * predict_ms(table, dense, pruned, inputs) + \
            overhead * dense_pred

    def kept_of(plan: hap.PruningPlan) -> float:
        dense_ms, pruned_ms = fake(model, hap.prune(model, plan), x[:1], batch, threads)
        calls.pop()
        return pruned_ms / dense_ms

    return model, x, sens, table, fake, calls, kept_of


def _plan(model, x, sens, table, t, **kw):
    return hap.plan(model, sens, hap.Target(latency=t), implant=None, example_inputs=x[:1], latency_table=table,
                    tol=0.03, **kw)


# -- the regula falsi step (pure) ------------------------------------------------------------------------------


def test_next_target_is_the_root_of_a_linear_measured_curve():
    def kept(x):  # measured: 0.6 of the predicted speed-up
        return 1.0 - 0.6 * x

    asked = 0.5
    root = (1 - asked) / 0.6
    # one plan, too slow: the secant through the dense model (0, 1) and it is the line itself
    assert next_internal_target([(0.5, kept(0.5))], asked, 0.95) == pytest.approx(root)
    # two too-slow plans: the secant through them
    assert next_internal_target([(0.3, kept(0.3)), (0.5, kept(0.5))], asked, 0.95) == pytest.approx(root)
    # a bracket: the secant between the nearest plan on each side
    pts = [(0.2, kept(0.2)), (0.6, kept(0.6)), (0.9, kept(0.9)), (0.95, kept(0.95))]
    assert next_internal_target(pts, asked, 0.95) == pytest.approx(root)
    assert next_internal_target([(0.5, kept(0.5))], asked, 0.7) == 0.7  # clamped to the most allowed
    assert next_internal_target([(0.5, 0.2)], 0.9, 0.95) >= 0.0  # clamped below too


def test_next_target_jumps_to_the_cap_on_a_flat_curve_and_survives_noise():
    assert next_internal_target([(0.5, 1.0)], 0.5, 0.8) == 0.8  # pruning changed nothing measurable
    assert next_internal_target([(0.3, 0.8), (0.5, 0.85)], 0.5, 0.9) == 0.9  # rising: noise, no direction
    # a fast plan measured below a slow one (noise): the bracket uses the slow plan *below* the fast one
    x = next_internal_target([(0.4, 0.45), (0.6, 0.55)], 0.5, 0.9)
    assert 0.0 < x < 0.4
    assert x == pytest.approx(0.4 * (1 - 0.5) / (1 - 0.45))


# -- the loop in hap.plan (fake stopwatch) ---------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.3, 0.5, 0.6])
def test_closed_loop_meets_the_measured_target_where_the_table_alone_does_not(t, monkeypatch):
    model, x, sens, table, fake, calls, kept_of = _setup()
    monkeypatch.setattr(planner, "_time_pair", fake)
    open_plan = _plan(model, x, sens, table, t, latency_iters=0)
    assert not calls and open_plan.settings["latency"]["closed_loop"] is False
    assert abs(kept_of(open_plan) / (1 - t) - 1) > 0.05  # the table's prediction misses, as on real CPUs
    plan = _plan(model, x, sens, table, t)
    lat = plan.settings["latency"]
    its = lat["iterations"]
    assert lat["closed_loop"] is True and lat["converged"] is True
    assert 2 <= len(its) == len(calls) <= PlanConfig().latency_iters
    assert calls == [(1, 1)] * len(its)  # timed at the table's batch and threads
    # the first iteration is the table's own plan; the record is what the stopwatch says of the returned plan
    assert its[0]["internal_target"] == t and its[0]["measured_kept"] == pytest.approx(kept_of(open_plan))
    assert lat["measured_kept"] == pytest.approx(kept_of(plan))
    assert lat["measured_ratio"] == pytest.approx(kept_of(plan) / (1 - t))
    assert abs(lat["measured_ratio"] - 1) <= PlanConfig().latency_tol
    assert plan.achieved_fraction() == pytest.approx(1 - lat["measured_kept"])
    small = hap.prune(model, plan)
    assert lat["predicted_ms"] == pytest.approx(predict_ms(table, model, small, x[:1]))
    for it in its:
        assert it["measured_kept"] == pytest.approx(it["measured_ms"] / it["measured_dense_ms"])
        assert it["predicted_kept"] == pytest.approx(it["predicted_ms"] / lat["dense_ms"])
    assert its[-1]["internal_target"] > t  # the table over-promises, so the loop asks it for more
    again = hap.PruningPlan.from_json(plan.to_json())
    assert again.settings == json.loads(json.dumps(plan.settings)) and again.to_dict() == plan.to_dict()
    assert again.achieved_fraction() == pytest.approx(plan.achieved_fraction())


def test_loop_times_at_the_tables_batch_and_threads_and_stops_at_latency_iters(monkeypatch):
    model, x, sens, table, fake, calls, _ = _setup(batch=3, threads=2)
    monkeypatch.setattr(planner, "_time_pair", fake)
    plan = _plan(model, x, sens, table, 0.5, latency_iters=1, latency_tol=0.01)
    lat = plan.settings["latency"]
    assert calls == [(3, 2)] and len(lat["iterations"]) == 1 and lat["converged"] is False
    assert lat["iterations"][0]["internal_target"] == 0.5  # one timed plan: the table's, measured and recorded


def test_a_table_without_batch_and_threads_is_trusted_open_loop(monkeypatch):
    model, x, sens, table, fake, calls, _ = _setup()
    table.meta = {"batch": 1}
    monkeypatch.setattr(planner, "_time_pair", fake)
    lat = _plan(model, x, sens, table, 0.5).settings["latency"]
    assert not calls and lat["closed_loop"] is False and "batch and threads" in lat["open_loop_reason"]


def test_a_latency_target_the_stopwatch_cannot_reach_says_so_and_what_to_ask(monkeypatch):
    model, x, sens, table, fake, calls, kept_of = _setup(overhead=2.0)  # overhead pruning cannot remove
    monkeypatch.setattr(planner, "_time_pair", fake)
    with pytest.raises(hap.PlanError) as e:
        _plan(model, x, sens, table, 0.5)
    msg = str(e.value)
    assert "\n" not in msg and "latency=0.5 cannot be met as measured" in msg and "most aggressive" in msg
    suggested = float(re.search(r"ask for latency=([0-9.]+) or less", msg).group(1))
    kept_at_most = float(re.search(r"keeps ([0-9.]+) of the dense", msg).group(1))
    assert 0 < suggested <= 1 - kept_at_most + 1e-9
    plan = _plan(model, x, sens, table, suggested)  # what the message says to ask for is met
    assert abs(kept_of(plan) / (1 - suggested) - 1) <= PlanConfig().latency_tol


def test_a_flat_measured_curve_tries_the_most_aggressive_plan_then_says_so(monkeypatch):
    model, x, sens, table, _, _, _ = _setup()
    calls = []
    monkeypatch.setattr(planner, "_time_pair", lambda *a: calls.append(a) or (2.0, 2.0))
    with pytest.raises(hap.PlanError, match="removes no measurable latency at this batch") as e:
        _plan(model, x, sens, table, 0.4)
    assert len(calls) == 2 and "\n" not in str(e.value)  # the table's plan, then the most aggressive one


def test_latency_loop_options_are_validated_and_set_by_hap_prune_flags():
    from hap.cli import build_parser
    from hap.cli.checks import validate_run_config
    from hap.cli.common import UserError
    from hap.cli.prune import RUN_OPTIONS, resolve

    assert PlanConfig(latency_iters=-1).problems()[0].field == "latency_iters"
    assert PlanConfig(latency_tol=0.0).problems()[0].field == "latency_tol"
    assert PlanConfig(latency_iters=0).problems() == [] and PlanConfig(latency_iters=True).problems()
    cfg = resolve(build_parser().parse_args(["prune", "--latency-iters", "2", "--latency-tol", "0.1", "--out", "x"]))
    assert cfg.plan.latency_iters == 2 and cfg.plan.latency_tol == 0.1
    assert resolve(build_parser().parse_args(["prune", "--out", "x"])).plan.latency_iters == PlanConfig().latency_iters
    with pytest.raises(UserError, match=r"^--latency-iters -1: must be an integer >= 0$"):  # before any compute
        resolve(build_parser().parse_args(["prune", "--latency-iters", "-1", "--out", "x"]))
    with pytest.raises(UserError, match=r"^--latency-tol 0.7: must be in \(0, 0.5\)$"):
        validate_run_config(cfg.replace(plan=cfg.plan.replace(latency_tol=0.7)), RUN_OPTIONS)
