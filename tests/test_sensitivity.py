"""``hap.sensitivity``: scores, baselines against brute force, JSON round-trip, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap

from ._exact import exact_block_traces, unit_masks, unit_params
from .conftest import make_tiny


def _units(model, x):
    return hap.flatten_units(hap.channel_groups(model, x))


def test_hap_score_is_relative_trace_times_squared_norm():
    model, x, y = make_tiny("convbn")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], max_samples=64, progress=False)
    units = [u.unit for u in sens.units]
    names, params = unit_params(model, units)
    flat = torch.cat([params[n].detach().flatten() for n in names])
    for u, m in zip(sens.units, unit_masks(units, params), strict=True):
        assert u.n == int(m.sum())
        assert u.sq_norm == pytest.approx(float((m * flat * flat).sum()))
        assert u.score == pytest.approx(u.trace / u.n * u.sq_norm)
    assert sens.samples >= 32 and sens.method == "hap" and sens.wall_time_s > 0


def test_hap_converges_to_exact_scores():
    model, x, y = make_tiny("mlp")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], curvature="hessian", max_samples=3000, min_samples=3000,
                           vectors_per_product=20, samples_per_batch=500, stability=None, tol=0.0, progress=False)
    exact = exact_block_traces(model, [u.unit for u in sens.units], x, y).numpy()
    tr = np.array([u.trace for u in sens.units])
    se = np.array([u.trace_se for u in sens.units])
    assert np.all(np.abs(tr - exact) < 4.5 * se)
    assert hap.estimate.spearman(tr, exact) > 0.9


def test_auto_curvature_is_fisher_for_channels_with_its_own_sample_bounds():
    model, x, y = make_tiny("convbn")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], stability=None, tol=0.0, progress=False)
    assert sens.settings["curvature"] == "fisher" and sens.samples == 8192 and sens.settings["max_samples"] == 8192
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], curvature="hessian", stability=None, tol=0.0,
                           progress=False)
    assert sens.settings["curvature"] == "hessian" and sens.samples == 512
    with pytest.raises(ValueError, match="curvature"):
        hap.sensitivity(model, F.cross_entropy, [(x, y)], curvature="newton")


def test_producer_scope_uses_only_producer_slices():
    model, x, y = make_tiny("convbn")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l2", scope="producer", progress=False)
    for u in sens.units:
        named = dict(model.named_parameters())
        want = sum(float((named[s.param].detach().index_select(s.dim, torch.tensor(s.indices)) ** 2).sum())
                   for s in u.slices if s.role == "out")
        assert u.score == pytest.approx(want)


def _brute(model, x, y, units, fn):
    names, params = unit_params(model, units)
    masks = unit_masks(units, params)
    return np.array([fn(m, names, params) for m in masks])


def test_l1_l2_match_brute_force(tiny):
    _, model, x, y = tiny
    units = _units(model, x)
    flat = lambda names, params: torch.cat([params[n].detach().flatten() for n in names])  # noqa: E731
    for method, f in (("l1", torch.abs), ("l2", torch.square)):
        sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], units=units, method=method, progress=False)
        want = _brute(model, x, y, units, lambda m, n, p, f=f: float((m * f(flat(n, p))).sum()))
        np.testing.assert_allclose(sens.scores, want, rtol=1e-10)


def test_taylor_and_obd_match_brute_force():
    model, x, y = make_tiny("convbn", n=6)
    units = _units(model, x)
    names, params = unit_params(model, units)
    masks = unit_masks(units, params)
    w = torch.cat([params[n].detach().flatten() for n in names])
    model.eval()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    # Taylor: |sum_u g*w| per batch, averaged over batches
    want_t = np.zeros(len(units))
    for xb, yb in batches:
        g = torch.autograd.grad(F.cross_entropy(model(xb), yb), [params[n] for n in names])
        gf = torch.cat([t.flatten() for t in g])
        want_t += np.array([abs(float((m * gf * w).sum())) for m in masks]) / 2
    sens = hap.sensitivity(model, F.cross_entropy, batches, units=units, method="taylor", progress=False)
    np.testing.assert_allclose(sens.scores, want_t, rtol=1e-8)
    # OBD: 1/2 sum_u w^2 E_n[g_n^2], per-example gradients with the true labels
    sq = torch.zeros_like(w)
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [params[n] for n in names])
        sq += torch.cat([t.flatten() for t in g]) ** 2
    want_o = np.array([0.5 * float((m * w * w * sq / len(x)).sum()) for m in masks])
    sens = hap.sensitivity(model, F.cross_entropy, batches, units=units, method="obd", progress=False)
    np.testing.assert_allclose(sens.scores, want_o, rtol=1e-8)


def test_random_is_seeded():
    model, x, y = make_tiny("mlp")
    a = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="random", seed=1, progress=False)
    b = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="random", seed=1, progress=False)
    c = hap.sensitivity(model, F.cross_entropy, [(x, y)], method="random", seed=2, progress=False)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_json_round_trip(tmp_path):
    model, x, y = make_tiny("residual")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], max_samples=16, progress=False)
    again = hap.Sensitivity.from_json(sens.to_json())
    assert again.to_json() == sens.to_json()
    assert [u.unit for u in again.units] == [u.unit for u in sens.units]
    path = sens.save(tmp_path / "sensitivity.json")
    assert hap.Sensitivity.load(path).digest() == sens.digest()
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    sens.check_model(model)
    with pytest.raises(ValueError, match="another model"):
        sens.check_model(make_tiny("convbn")[0])


def test_mapping_inputs_are_keyword_arguments():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_tiny("mlp")[0]

        def forward(self, input_ids, scale):
            return self.inner(input_ids * scale)

    model, x, y = make_tiny("mlp")
    kw = KW().double()
    kw.inner.load_state_dict(model.state_dict())
    a = hap.sensitivity(kw, F.cross_entropy, [({"input_ids": x, "scale": torch.tensor(1.0)}, y)],
                        max_samples=16, progress=False, seed=4)
    b = hap.sensitivity(model, F.cross_entropy, [(x, y)], max_samples=16, progress=False, seed=4)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9)


def test_fisher_scores_are_positive():
    model, x, y = make_tiny("convbn")
    sens = hap.sensitivity(model, F.cross_entropy, [(x, y)], curvature="fisher", max_samples=64, progress=False)
    assert all(u.trace > 0 and u.score > 0 for u in sens.units)
    assert math.isfinite(sens.split_half)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [], progress=False), ValueError, "empty"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [(x, y)], max_samples=0), ValueError, "max_samples"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [(x, y)], method="magic"), ValueError, "unknown method"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [(x, y)], units="rows"), ValueError, "unknown units"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [(x * float("inf"), y)], progress=False),
         RuntimeError, "loss is"),
        (lambda m, x, y: hap.sensitivity(nn.Linear(5, 3).double(), F.cross_entropy, [(x, y)]), ValueError,
         "no prunable"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [(x, y)], units=[
            hap.Unit("g", 0, (hap.ParamSlice("missing.weight", 0, (0,)),))]), ValueError, "missing.weight"),
        (lambda m, x, y: hap.sensitivity(m, F.cross_entropy, [x]), ValueError, "pairs"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, words):
    model, x, y = make_tiny("mlp")
    with pytest.raises(exc, match=words):
        call(model, x, y)
