"""hap.latency_table: a measured table covers the model's layers, is cached, reused, and measured again
(the stale file replaced) when the machine key changes; a plan from a measured table meets its prediction."""

from __future__ import annotations

import pytest
import torch

import hap
import hap.latency_table as lt

from ._latency_helpers import quick, tiny


def test_cache_reused_and_invalidated_when_the_key_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CACHE", str(tmp_path))
    model, x, _ = tiny()
    calls = []
    real = lt._time_layer
    monkeypatch.setattr(lt, "_time_layer", lambda *a: calls.append(a) or real(*a))
    t1 = quick(model, x, sweep=False)
    n = len(calls)
    assert n > 0 and len(list((tmp_path / "latency").glob("*.json"))) == 1
    assert set(t1.layers) == set(lt.layer_keys(model, x[:1]).values()) and t1.dense_ms > 0
    t2 = quick(model, x, sweep=False)
    assert len(calls) == n and t2.to_dict() == t1.to_dict()  # cache hit: nothing timed again
    real_key = lt.machine_key
    for change in ({"threads": 7}, {"torch": "0.0.1"}, {"cpu": "another CPU"}):
        monkeypatch.setattr(lt, "machine_key", lambda *a, change=change: real_key(*a) | change)
        before = len(calls)
        t3 = quick(model, x, sweep=False)
        assert len(calls) == before + n and all(t3.meta[k] == v for k, v in change.items())
    assert len(list((tmp_path / "latency").glob("*.json"))) == 1  # the stale table was replaced, not kept


def test_latency_plan_with_a_measured_table(tmp_path, monkeypatch):
    monkeypatch.setenv("HAP_CACHE", str(tmp_path))
    model, _, sens = tiny()
    x = torch.randn(2, 3, 16, 16)  # 16 x 16: the convolutions, not per-call overhead, dominate the time
    table = quick(model, x, sweep=False)
    plan = hap.plan(model, sens, hap.Target(latency=0.3), implant=None, example_inputs=x[:1], latency_table=table,
                    tol=0.15, latency_iters=0)
    assert abs(plan.achieved_fraction("latency") - 0.3) <= 0.15
    small = hap.prune(model, plan)
    assert lt.predict_ms(table, model, small, x[:1]) == pytest.approx(plan.settings["latency"]["predicted_ms"])


def test_closed_loop_times_the_plan_with_the_real_stopwatch(tmp_path, monkeypatch):
    """One timed iteration with :func:`hap.bench` at the table's batch: the table's plan, its measurement recorded
    (the deterministic convergence tests, with a fake stopwatch, are in tests/planning/test_latency_loop.py)."""
    monkeypatch.setenv("HAP_CACHE", str(tmp_path))
    model, _, sens = tiny()
    x = torch.randn(2, 3, 16, 16)
    table = quick(model, x, sweep=False)
    kw = {"implant": None, "example_inputs": x[:1], "latency_table": table, "tol": 0.15}
    open_plan = hap.plan(model, sens, hap.Target(latency=0.3), latency_iters=0, **kw)
    plan = hap.plan(model, sens, hap.Target(latency=0.3), latency_iters=1, **kw)
    lat = plan.settings["latency"]
    (it,) = lat["iterations"]
    assert plan.groups == open_plan.groups and lat["closed_loop"] is True and it["internal_target"] == 0.3
    assert it["measured_ms"] > 0 and it["measured_dense_ms"] > 0
    assert lat["measured_kept"] == pytest.approx(it["measured_ms"] / it["measured_dense_ms"])
    assert lat["measured_ratio"] == pytest.approx(lat["measured_kept"] / 0.7)
    assert plan.achieved_fraction() == pytest.approx(1 - lat["measured_kept"])
