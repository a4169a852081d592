"""The Hutchinson engine against exact Hessians from ``torch.func.hessian``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hap.estimate.hutchinson import _HVP, _probes, _rademacher, estimate_traces
from hap.estimate.reduce import UnitReducer
from hap.estimate.stats import spearman
from hap.units.channels import channel_groups, flatten_units

from .._exact import exact_block_traces, exact_fisher_traces, full_hessian, unit_masks, unit_params
from ..conftest import make_tiny


def _units(model, x):
    return flatten_units(channel_groups(model, x))


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("backend", ["double_backward", "functorch"])
def test_hvp_matches_exact_hessian(tiny, backend):
    _, model, x, y = tiny
    units = _units(model, x)
    names, params = unit_params(model, units)
    h = full_hessian(model, params, x, y)
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    model.eval()
    hv = _HVP(model, F.cross_entropy, params, (x, y), 0, backend)(v, batched=False)
    got = torch.cat([hv[n].flatten() for n in names])
    want = h @ torch.cat([v[n].flatten() for n in names])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_reducer_matches_masks(tiny):
    _, model, x, _ = tiny
    units = _units(model, x)
    names, params = unit_params(model, units)
    gen = torch.Generator().manual_seed(2)
    z = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    flat = torch.cat([z[n].flatten() for n in names])
    for scope in ("all", "producer"):
        red = UnitReducer(units, {n: p.shape for n, p in params.items()}, scope=scope)
        want = torch.stack([(m * flat).sum() for m in unit_masks(units, params, scope)])
        torch.testing.assert_close(red(z), want)
        # the batched path gives the same per row
        zb = {n: torch.stack([t, 2 * t]) for n, t in z.items()}
        torch.testing.assert_close(red(zb, batched=True), torch.stack([want, 2 * want]))


def test_overlapping_slices_counted_once():
    """``x + conv(x)``: the unit holds the conv's row i and column i; element (i, i) counts once."""
    model, x, _ = make_tiny("residual")
    units = _units(model, x)
    shared = [u for u in units if {(s.param, s.dim) for s in u.slices} >= {("conv.weight", 0), ("conv.weight", 1)}]
    assert shared, "the residual fixture must couple conv's input and output channels"
    names, params = unit_params(model, units)
    red = UnitReducer(units, {n: p.shape for n, p in params.items()})
    n_u = red.counts()
    want = torch.stack([m.sum() for m in unit_masks(units, params)])
    torch.testing.assert_close(n_u, want)


def test_one_vector_for_all_units_is_exact_in_expectation(tiny):
    """Averaged over the rows of a Hadamard matrix (for which E[v v^T] = I holds exactly, not just in
    expectation), ``v_u . (Hv)_u`` from ONE vector over all units equals every block trace exactly."""
    _, model, x, y = tiny
    units = _units(model, x)
    names, params = unit_params(model, units)
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)
    rows = _hadamard(total)[:, :total]
    if rows.shape[0] > 1024:
        pytest.skip("too many parameters for an exhaustive Hadamard sweep")
    red = UnitReducer(units, {n: p.shape for n, p in params.items()})
    model.eval()
    hvp = _HVP(model, F.cross_entropy, params, (x, y), 0, "double_backward")
    acc = torch.zeros(len(units), dtype=torch.float64)
    for r in rows:
        v, o = {}, 0
        for n, s in zip(names, sizes, strict=True):
            v[n] = r[o : o + s].view(params[n].shape)
            o += s
        hv = hvp(v, batched=False)
        acc += red({n: v[n] * hv[n] for n in names})
    acc /= rows.shape[0]
    torch.testing.assert_close(acc, exact_block_traces(model, units, x, y), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("probe", ["global", "partitioned"])
def test_estimates_converge_and_standard_errors_cover(tiny, probe):
    name, model, x, y = tiny
    units = _units(model, x)
    exact = exact_block_traces(model, units, x, y).numpy()
    est = estimate_traces(
        model, F.cross_entropy, [(x[:8], y[:8]), (x[8:], y[8:])], units,
        max_samples=400, min_samples=400, samples_per_batch=50, vectors_per_product=10,
        probe=probe, stability=None, tol=0.0, progress=False, seed=3,
    )
    # the loss over two batches of 8 is the mean of the two halves' losses: the batch-averaged
    # exact trace is the whole-batch one
    z = (est.trace - exact) / est.trace_se
    assert np.all(np.abs(z) < 4.5), f"{name}: estimate off by {np.abs(z).max():.2f} standard errors"
    assert np.mean(np.abs(z) < 2) >= 0.8, f"{name}: the reported SE covers too rarely"
    assert est.samples == 400 and not est.converged


def test_fisher_curvature_matches_exact_fisher():
    model, x, y = make_tiny("convbn", n=6)
    units = _units(model, x)
    exact = exact_fisher_traces(model, units, x, y).numpy()
    est = estimate_traces(
        model, F.cross_entropy, [(x, y)], units, curvature="fisher",
        max_samples=600, min_samples=600, stability=None, tol=0.0, progress=False,
    )
    assert np.all(est.trace >= 0)
    z = (est.trace - exact) / est.trace_se
    assert np.all(np.abs(z) < 4.5)


def test_stops_when_stable_and_says_so():
    model, x, y = make_tiny("mlp")
    units = _units(model, x)
    est = estimate_traces(model, F.cross_entropy, [(x, y)], units, max_samples=2000, min_samples=16,
                          stability=0.5, tol=0.0, progress=False)
    assert est.converged and "stability" in est.stop_reason and est.samples < 2000
    assert est.split_half >= 0.5
    est = estimate_traces(model, F.cross_entropy, [(x, y)], units, max_samples=8, min_samples=4,
                          stability=1.01, tol=0.0, progress=False)
    assert not est.converged and "max_samples" in est.stop_reason


def test_seeded_and_mode_restored():
    model, x, y = make_tiny("convbn")
    model.train()
    model.bn2.eval()
    units = _units(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = estimate_traces(model, F.cross_entropy, [(x, y)], units, max_samples=16, progress=False, seed=7)
    b = estimate_traces(model, F.cross_entropy, [(x, y)], units, max_samples=16, progress=False, seed=7)
    np.testing.assert_array_equal(a.trace, b.trace)
    assert model.training and model.bn1.training and not model.bn2.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # BN running stats untouched


def test_backends_agree_sample_by_sample():
    model, x, y = make_tiny("residual")
    units = _units(model, x)
    kw = dict(max_samples=8, min_samples=8, progress=False, seed=5, stability=None, tol=0.0)
    a = estimate_traces(model, F.cross_entropy, [(x, y)], units, backend="double_backward", **kw)
    b = estimate_traces(model, F.cross_entropy, [(x, y)], units, backend="functorch", **kw)
    np.testing.assert_allclose(a.trace, b.trace, rtol=1e-8, atol=1e-12)


def test_spearman():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(max_samples=0), ValueError, "max_samples"),
        (dict(probe="bogus"), ValueError, "probe"),
        (dict(curvature="bogus"), ValueError, "curvature"),
    ],
)
def test_bad_settings(kwargs, exc, words):
    model, x, y = make_tiny("mlp")
    units = _units(model, x)
    with pytest.raises(exc, match=words):
        estimate_traces(model, F.cross_entropy, [(x, y)], units, progress=False, **kwargs)


def test_bad_inputs():
    model, x, y = make_tiny("mlp")
    units = _units(model, x)
    with pytest.raises(ValueError, match="empty"):
        estimate_traces(model, F.cross_entropy, [], units, progress=False)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="loss is nan"):
        estimate_traces(model, F.cross_entropy, [(bad, y)], units, progress=False)
    other = nn.Sequential(nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="does not have"):
        estimate_traces(other, F.cross_entropy, [(x, y)], units, progress=False)


def test_looped_per_example_gradients_equal_vmap():
    """The fallback for models vmap cannot trace gives the same per-example gradients."""
    from hap.estimate.fisher import _looped_grads, per_example_grads

    model, x, y = make_tiny("residual", n=5)
    model.eval()
    units = _units(model, x)
    _, params = unit_params(model, units)
    (vm,) = list(per_example_grads(model, F.cross_entropy, params, x, y, chunk=8))
    lp = _looped_grads(model, F.cross_entropy, params, x, y, set())
    for n in params:
        torch.testing.assert_close(vm[n], lp[n])


@pytest.mark.parametrize("k", [1, 3])
def test_one_draw_of_all_probes_is_the_per_parameter_stream(k):
    """The single draw split into parameters is bit for bit the old one-draw-per-parameter stream, so
    estimates did not change when the draws were fused."""
    shapes = {"a.weight": torch.Size((5, 3, 3, 3)), "a.bias": torch.Size((5,)), "b.weight": torch.Size((2, 7))}
    gen = torch.Generator().manual_seed(11)
    want = {n: _rademacher(torch.Size((k, *s)), gen, torch.float64) for n, s in shapes.items()}
    after_want = torch.randint(0, 1000, (4,), generator=gen)
    gen = torch.Generator().manual_seed(11)
    got = _probes(shapes, k, gen, torch.float64, torch.device("cpu"))
    assert list(got) == list(shapes)
    for n in shapes:
        assert got[n].shape == (k, *shapes[n]) and got[n].dtype == torch.float64
        assert torch.equal(got[n], want[n])
    assert torch.equal(torch.randint(0, 1000, (4,), generator=gen), after_want)  # the generator moved as far
    per_param = _probes(shapes, k, torch.Generator().manual_seed(11), torch.float64, dict.fromkeys(shapes, "cpu"))
    assert all(torch.equal(per_param[n], want[n]) for n in shapes)
