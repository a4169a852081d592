"""The hook-based (memory-lean) Fisher against the vmap reference: same rows, to float tolerance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
import hap.models.tiny as tiny_zoo
from hap._hf import eager_attention
from hap._utils import eval_mode
from hap.estimate.batchgrad import _conv_weight_grads, _rows_cols, lean_support
from hap.estimate.fisher import FisherSampler
from hap.estimate.hutchinson import estimate_traces
from hap.estimate.reduce import UnitReducer
from hap.sensitivity import _discover
from hap.units.base import ROLE_IN, ParamSlice, Unit

from ..conftest import TINY, make_tiny


def _rows(model, loss_fn, batch, units, backend, scope="all", limit=100):
    named = dict(model.named_parameters())
    params = {n: named[n] for n in sorted({s.param for u in units for s in u.slices})}
    red = UnitReducer(units, {n: p.shape for n, p in params.items()}, scope=scope)
    with eval_mode(model), eager_attention(model):  # as the estimator runs it
        sampler = FisherSampler(model, loss_fn, params, red, backend)
        rows = np.array(sampler(batch, 0, torch.Generator().manual_seed(3), limit))
    return rows, sampler


def _assert_same(model, loss_fn, batch, units, scope="all", backend="hooks"):
    want, ref = _rows(model, loss_fn, batch, units, "vmap", scope)
    got, lean = _rows(model, loss_fn, batch, units, backend, scope)
    assert ref.backend == "vmap" and lean.backend == "hooks", lean.fallback
    assert want.shape == got.shape and want.shape[1] == len(units)
    assert np.all(want >= 0) and want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * want.max())


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("scope", ["all", "producer"])
def test_hooks_equal_vmap_on_tiny_nets(name, scope):
    """Channels of Linear/conv chains, BatchNorm, a residual layer whose rows and columns overlap (the
    full elementwise path), concat + depthwise (grouped convs)."""
    model, x, y = make_tiny(name, n=6)
    units = _discover("channels", model, x, ())
    _assert_same(model, F.cross_entropy, (x, y), units, scope)


@pytest.mark.parametrize("cls", ["TinyMLP", "TinyConvBN", "TinyResidual", "TinyConcatDepthwise"])
def test_hooks_equal_vmap_on_the_zoo_tiny_models(cls):
    torch.manual_seed(0)
    model = getattr(tiny_zoo, cls)().double()
    x = torch.randn(5, *model.input_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _assert_same(model, F.cross_entropy, (x, y), _discover("channels", model, x, ()))


@pytest.mark.parametrize("family", ["heads", "neurons", "heads,neurons"])
def test_hooks_equal_vmap_on_tiny_bert(family):
    from ..text.conftest import make_bert

    model = make_bert().double()
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0  # padding: per-example gradients must ignore the padded positions of other rows
    x = {"input_ids": torch.randint(0, 25, (4, 7), generator=gen), "attention_mask": mask}
    y = torch.randint(0, 2, (4,), generator=gen)
    units = _discover(family, model, x, ())
    _assert_same(model, lambda o, t: F.cross_entropy(o.logits, t), (x, y), units)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("t", [1, 3, 40])
def test_gram_and_materialised_marginals_agree(groups, t):
    """Both ways of getting row/column norms (T x T Gram matrices or the layer's per-example gradient)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, groups, 5, t, generator=gen, dtype=torch.float64)
    a = torch.randn(3, groups, 4, t, generator=gen, dtype=torch.float64)
    gw = torch.einsum("bkot,bkit->bkoi", g, a)
    want0 = (gw**2).sum(3).reshape(3, -1)
    want1 = (gw**2).sum((1, 2))
    for full in (False, True):
        got = _rows_cols(g, a, {0, 1}, full)
        torch.testing.assert_close(got[0], want0)
        torch.testing.assert_close(got[1], want1)


_CONV_CASES = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "stride-dilation": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    "groups-reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
    "same-circular": lambda: nn.Conv2d(4, 4, (3, 2), padding="same", padding_mode="circular", groups=4),
    "conv1d-same": lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2),
    "conv1d-stride": lambda: nn.Conv1d(4, 6, 2, stride=2, bias=False),
}


@pytest.mark.parametrize("case", sorted(_CONV_CASES))
def test_conv_weight_grads_are_the_per_example_gradients(case):
    """The grouped-backward per-example weight gradients against torch.func's, for every padding flavour."""
    torch.manual_seed(0)
    conv = _CONV_CASES[case]().double()
    x = torch.randn(3, 4, *((9, 8) if isinstance(conv, nn.Conv2d) else (11,)), dtype=torch.float64)
    g = torch.randn_like(conv(x))

    def dot(w: torch.Tensor, xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(conv, {"weight": w}, (xi[None],), strict=False)
        return (out * gi[None]).sum()

    want = torch.func.vmap(torch.func.grad(dot), in_dims=(None, 0, 0))(conv.weight.detach(), x, g)
    torch.testing.assert_close(_conv_weight_grads(conv, x, g), want)


def test_hooks_equal_vmap_on_strided_grouped_padded_convs():
    """The estimator's rows through those convolutions (stride, dilation, depthwise, padding modes)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.Tanh(),
        nn.Conv2d(8, 6, 3, padding="same", padding_mode="replicate"), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()
    x = torch.randn(5, 2, 10, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    units = _discover("channels", model, x, ())
    assert units
    _assert_same(model, F.cross_entropy, (x, y), units)


class _Mixed(nn.Module):
    """An embedding (unsupported), a Conv1d, a LayerNorm, and a Linear run twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding="same")
        self.norm = nn.LayerNorm(6)
        self.twice = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        h = self.norm(h)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.fc(h.mean(1))


def _mixed_units(model: _Mixed, with_emb: bool, with_twice: bool) -> list[Unit]:
    units = []
    for c in range(6):
        slices = [ParamSlice("conv.weight", 0, (c,)), ParamSlice("conv.bias", 0, (c,)),
                  ParamSlice("norm.weight", 0, (c,)), ParamSlice("norm.bias", 0, (c,)),
                  ParamSlice("fc.weight", 1, (c,), ROLE_IN)]
        if with_twice:
            slices.append(ParamSlice("twice.weight", 1, (c,), ROLE_IN))
        units.append(Unit("conv", c, tuple(slices)))
    if with_emb:
        units += [Unit("emb", c, (ParamSlice("emb.weight", 1, (c,)), ParamSlice("conv.weight", 1, (c,), ROLE_IN)))
                  for c in range(4)]
    return units


def _mixed():
    torch.manual_seed(0)
    model = _Mixed().double()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 10, (5, 7), generator=gen), torch.randint(0, 3, (5,), generator=gen)


def test_conv1d_and_layernorm_are_served_by_hooks():
    model, x, y = _mixed()
    _assert_same(model, F.cross_entropy, (x, y), _mixed_units(model, with_emb=False, with_twice=False))


@pytest.mark.parametrize("with_emb,with_twice", [(True, False), (False, True), (True, True)])
def test_unsupported_parameters_fall_back_to_vmap_and_say_so(with_emb, with_twice):
    model, x, y = _mixed()
    units = _mixed_units(model, with_emb, with_twice)
    want, _ = _rows(model, F.cross_entropy, (x, y), units, "vmap")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, lean = _rows(model, F.cross_entropy, (x, y), units, "hooks")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * want.max())
    assert lean.backend == "hooks+vmap"
    assert any("more than once" in str(w.message) for w in caught) == with_twice  # said when it happens
    if with_emb:
        assert "Embedding" in lean.fallback["emb.weight"]
    if with_twice:
        assert "more than once" in lean.fallback["twice.weight"]
    assert "conv.weight" not in lean.fallback and "norm.weight" not in lean.fallback
    # auto uses vmap for everything as soon as one parameter is not served
    auto_rows, auto = _rows(model, F.cross_entropy, (x, y), units, "auto")
    assert auto.backend == "vmap"
    np.testing.assert_allclose(auto_rows, want, rtol=1e-12)


def test_lean_support_names_the_reason():
    model, _, _ = _mixed()
    ok, why = lean_support(model, ["emb.weight", "conv.weight", "norm.bias", "twice.weight"])
    assert set(ok) == {"conv.weight", "norm.bias", "twice.weight"} and set(why) == {"emb.weight"}


def test_estimate_and_sensitivity_record_and_agree_across_backends():
    model, x, y = make_tiny("convbn", n=12)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    units = _discover("channels", model, x, ())
    ests = {b: estimate_traces(model, F.cross_entropy, batches, units, curvature="fisher", fisher_backend=b,
                               max_samples=24, min_samples=24, stability=None, tol=0.0, progress=False)
            for b in ("vmap", "hooks", "auto")}
    assert ests["vmap"].fisher_backend == "vmap" and ests["auto"].fisher_backend == "hooks"
    for b in ("hooks", "auto"):
        np.testing.assert_allclose(ests[b].trace, ests["vmap"].trace, rtol=1e-9)
        np.testing.assert_allclose(ests[b].trace_se, ests["vmap"].trace_se, rtol=1e-7)
    s = hap.sensitivity(model, F.cross_entropy, batches, progress=False, max_samples=12, fisher_backend="hooks")
    assert s.settings["fisher_backend"] == "hooks" and s.settings["fisher_backend_used"] == "hooks"
    with pytest.raises(ValueError, match="fisher_backend"):
        hap.sensitivity(model, F.cross_entropy, batches, progress=False, max_samples=12, fisher_backend="bogus")


def test_hooks_warns_when_it_falls_back():
    model, x, y = _mixed()
    units = _mixed_units(model, with_emb=True, with_twice=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimate_traces(model, F.cross_entropy, [(x, y)], units, curvature="fisher", fisher_backend="hooks",
                        max_samples=5, min_samples=5, stability=None, tol=0.0, progress=False)
    assert any("emb.weight" in str(w.message) and "vmap" in str(w.message) for w in caught)


def test_chunked_hook_passes_change_nothing():
    model, x, y = make_tiny("residual", n=7)
    units = _discover("channels", model, x, ())
    named = dict(model.named_parameters())
    params = {n: named[n] for n in sorted({s.param for u in units for s in u.slices})}
    red = UnitReducer(units, {n: p.shape for n, p in params.items()})
    with eval_mode(model):
        rows = [np.array(FisherSampler(model, F.cross_entropy, params, red, "hooks", chunk=c)(
            (x, y), 0, torch.Generator().manual_seed(0), 100)) for c in (7, 3, 1)]
    assert rows[0].shape == (7, len(units))
    for r in rows[1:]:
        np.testing.assert_allclose(r, rows[0], rtol=1e-12, atol=1e-15 * rows[0].max())


@pytest.mark.parametrize("family", ["heads", "neurons"])
def test_hooks_equal_vmap_on_a_tiny_llama_with_token_labels(family):
    """A decoder (grouped-query attention, gated feed-forward), the Fisher over per-token sampled labels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, head_dim=4, intermediate_size=16)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    gen = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, 40, (3, 5), generator=gen)}
    y = torch.randint(0, 40, (3, 5), generator=gen)
    units = _discover(family, model, x, ())
    _assert_same(model, lambda o, t: F.cross_entropy(o.logits.flatten(0, 1), t.flatten()), (x, y), units)
