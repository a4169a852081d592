"""The two adapters onto third-party internals, pinned: these fail loudly when the pinned Torch-Pruning or
transformers release changes what hap reads from it (group items, index maps, the op counter, the
attention-implementation switch)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn as nn

from hap import _hf, _tp
from hap.models.tiny import TinyConcatDepthwise, TinyResidual, example_input

from .conftest import make_tiny


def test_torch_pruning_is_the_pinned_release():
    assert importlib.metadata.version("torch-pruning") == "1.6.1", "hap._tp is checked against torch-pruning 1.6.1"


def test_group_items_of_a_residual_model():
    model = TinyResidual().eval()
    dg = _tp.build_dependency_graph(model, example_input(model))
    groups = _tp.all_groups(dg, ignored=[])
    names = {m: n for n, m in model.named_modules()}
    assert groups and all(isinstance(it, _tp.Item) for g in groups for it in g)
    for g in groups:
        root = g[0]
        assert isinstance(root.module, nn.Conv2d | nn.Linear) and root.is_out
        for it in g:
            assert len(it.idxs) == len(it.roots) and all(r >= 0 for r in it.roots)
    # the residual stream: several producers share one group, their output channels cut together
    producers = [{names[it.module] for it in g if it.is_out and isinstance(it.module, nn.Conv2d)} for g in groups]
    assert max(len(p) for p in producers) >= 2


def test_index_maps_behind_a_concat_and_a_flatten():
    model = TinyConcatDepthwise().eval()
    dg = _tp.build_dependency_graph(model, example_input(model))
    group = next(g for g in _tp.all_groups(dg, ignored=[]) if g[0].module is model.depthwise)
    a = next(it for it in group if it.module is model.branch_a)
    b = next(it for it in group if it.module is model.branch_b)
    assert sorted(a.roots + b.roots) == list(range(8)) and not set(a.roots) & set(b.roots)  # concat offsets

    flat, x, _ = make_tiny("concat_dw")  # pools to 2x2 and flattens into a Linear
    dg = _tp.build_dependency_graph(flat.eval(), x)
    fc = [m for m in flat.modules() if isinstance(m, nn.Linear)][-1]
    assert any(it.module is fc and not it.is_out and len(set(it.roots)) < len(it.roots)
               for g in _tp.all_groups(dg, ignored=[]) for it in g), "one channel owns several Linear inputs"


def test_physical_cut():
    model = TinyConcatDepthwise().eval()
    x = example_input(model)
    dg = _tp.build_dependency_graph(model, x)
    root = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    before = root.out_channels
    _tp.prune_out_channels(dg, root, [0])
    assert root.out_channels == before - 1
    model(x)  # the graph cut every coupled layer: the model still runs


def test_op_counter_counts_macs_and_the_disposable_path_agrees():
    lin = nn.Sequential(nn.Linear(7, 5, bias=False))
    x = torch.zeros(1, 7)
    assert _tp.count_ops(lin, x) == 35
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False))
    xc = torch.zeros(1, 2, 4, 4)
    assert _tp.count_ops(conv, xc) == 2 * 3 * 9 * 16
    model = TinyResidual()
    xm = example_input(model, batch_size=1)
    assert _tp.count_ops_disposable(model, xm) == _tp.count_ops(model, xm)


def test_transformers_honours_the_attention_switch():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                                  intermediate_size=8, max_position_embeddings=16, attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 20, (2, 5))
    ref = model(input_ids=ids).last_hidden_state
    assert model.config._attn_implementation == "sdpa"
    calls = []
    fn = transformers.models.bert.modeling_bert.eager_attention_forward
    transformers.models.bert.modeling_bert.eager_attention_forward = lambda *a, **k: calls.append(1) or fn(*a, **k)
    try:
        with _hf.eager_attention(model):
            assert model.config._attn_implementation == "eager"
            out = model(input_ids=ids).last_hidden_state
    finally:
        transformers.models.bert.modeling_bert.eager_attention_forward = fn
    assert calls, "transformers no longer reads config._attn_implementation_internal at forward time"
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
