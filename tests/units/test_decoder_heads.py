"""Decoder attention heads (Llama / Qwen2 / Mistral with GQA, GPT-2's fused Conv1D) on tiny random-init models.

Every surgery is checked against the masked original (the removed units' output-projection columns zeroed by
a hook), with sdpa and eager attention, including a layer that loses every unit; GQA layouts stay valid
under any plan; generation with a KV cache gives the masked model's tokens.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext

import pytest
import torch

from hap._hf import eager_attention
from hap.units.decoder import HeadlessDecoderAttention
from hap.units.heads import attention_layouts, head_units, mask_heads, prune_heads
from tests._tiny_llm import DECODERS, logits, make_decoder, token_batch

pytest.importorskip("transformers")

# (style, units per layer, q rows / o columns per unit, K/V rows per unit, query heads per unit)
GEOMETRY = {"llama": ("gqa", 2, 16, 8, 2), "qwen2": ("gqa", 2, 16, 8, 2), "mistral": ("gqa", 1, 32, 8, 4),
            "gpt2": ("gpt2", 4, 8, 8, 1)}


@pytest.mark.parametrize("arch", DECODERS)
def test_layouts_found_structurally(arch):
    model = make_decoder(arch)
    lays = attention_layouts(model)
    assert len(lays) == 2
    assert {(lay.style, lay.num_heads, lay.head_size, lay.kv_size, lay.heads_per_unit) for lay in lays} == {
        GEOMETRY[arch]}
    assert all(lay.query_heads == 4 for lay in lays)


def test_gqa_unit_is_a_whole_kv_group():
    model = make_decoder("llama")
    u = head_units(model)[1]  # layer 0, KV group 1: query heads 2 and 3, KV head 1
    assert (u.group, u.index, u.kind) == ("model.layers.0.self_attn", 1, "head")
    got = {(s.param.removeprefix(u.group + "."), s.dim, s.role): s.indices for s in u.slices}
    q, kv = tuple(range(16, 32)), tuple(range(8, 16))
    assert got == {("q_proj.weight", 0, "out"): q, ("q_proj.bias", 0, "out"): q, ("k_proj.weight", 0, "out"): kv,
                   ("k_proj.bias", 0, "out"): kv, ("v_proj.weight", 0, "out"): kv, ("v_proj.bias", 0, "out"): kv,
                   ("o_proj.weight", 1, "in"): q}


def test_gpt2_unit_is_fused_columns_and_conv1d_rows():
    model = make_decoder("gpt2")
    u = head_units(model)[5]  # layer 1, head 1
    cols = tuple(range(8, 16)) + tuple(range(40, 48)) + tuple(range(72, 80))
    assert [(s.param, s.dim, s.indices, s.role) for s in u.slices] == [
        ("transformer.h.1.attn.c_attn.weight", 1, cols, "out"), ("transformer.h.1.attn.c_attn.bias", 0, cols, "out"),
        ("transformer.h.1.attn.c_proj.weight", 0, tuple(range(8, 16)), "in")]


def _remove(arch: str, lays) -> dict[str, list[int]]:
    if arch == "mistral":  # one KV group per layer: layer 1 loses it, layer 0 keeps it
        return {lays[1].name: [0]}
    return {lays[0].name: [lays[0].num_heads - 1], lays[1].name: list(range(lays[1].num_heads))}


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_equals_masked(arch, attn):
    model = make_decoder(arch)
    x = token_batch(1)
    lays = attention_layouts(model)
    remove = _remove(arch, lays)
    with eager_attention(model) if attn == "eager" else nullcontext():
        dense = logits(model, x)
        with mask_heads(model, remove):
            masked = logits(model, x)
            masked_positional = logits(model, x["input_ids"])
        small = prune_heads(copy.deepcopy(model), remove)
        pruned = logits(small, x)
        positional = logits(small, x["input_ids"])
    assert (masked - dense).abs().max() > 1e-3  # the units mattered
    torch.testing.assert_close(pruned, masked, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(positional, masked_positional, rtol=1e-9, atol=1e-10)
    after = attention_layouts(small)
    assert [lay.num_heads for lay in after] == [lays[i].num_heads - len(remove.get(lay.name, [])) for i, lay in
                                                enumerate(lays)]
    assert isinstance(small.get_submodule(lays[1].core), HeadlessDecoderAttention)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    per_unit = sum(len(s.indices) * shapes[s.param].numel() // shapes[s.param][s.dim]
                   for s in head_units(model)[0].slices)
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == n - per_unit * sum(len(v) for v in remove.values())
    # a second pruning renumbers the kept units and composes
    if arch != "mistral":
        again = prune_heads(copy.deepcopy(small), {lays[0].name: [0]})
        with mask_heads(model, {**remove, lays[0].name: [0, lays[0].num_heads - 1]}):
            torch.testing.assert_close(logits(again, x), logits(model, x), rtol=1e-9, atol=1e-10)


def _check_valid(model) -> None:
    for lay in attention_layouts(model):
        att = model.get_submodule(lay.core)
        if lay.style != "gqa":
            continue
        d = att.head_dim
        q, k, v, o = (model.get_submodule(n) for n in (lay.query, lay.key, lay.value, lay.output))
        n_q, n_kv = q.out_features // d, k.out_features // d
        assert q.out_features % d == 0 and k.out_features % d == 0 and v.out_features == k.out_features
        assert o.in_features == q.out_features
        if n_kv:
            assert n_q % n_kv == 0 and n_q // n_kv == att.num_key_value_groups


def test_gqa_layer_never_split_invalidly():
    """Property: whatever KV groups any layer loses, every layer stays a valid GQA layout and runs."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, head_dim=4, intermediate_size=16)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    x = {"input_ids": torch.randint(0, 40, (2, 6))}
    lays = attention_layouts(model)
    assert [(lay.num_heads, lay.heads_per_unit) for lay in lays] == [(4, 2), (4, 2)]
    subsets = [list(c) for r in range(5) for c in itertools.combinations(range(4), r)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        r0, r1 = (subsets[int(i)] for i in torch.randint(0, len(subsets), (2,), generator=gen))
        spec = {lays[0].name: r0, lays[1].name: r1}
        small = prune_heads(copy.deepcopy(model), spec)
        _check_valid(small)
        with mask_heads(model, spec):
            want = logits(model, x)
        torch.testing.assert_close(logits(small, x), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_kv_cache_matches_masked(arch):
    model = make_decoder(arch)
    lays = attention_layouts(model)
    remove = {lays[0].name: [0], lays[1].name: [1]}
    prompt = token_batch(3, n=2, t=5, pad=False)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with mask_heads(model, remove):
        want = model.generate(**prompt, **kw)
    small = prune_heads(copy.deepcopy(model), remove)
    got = small.generate(**prompt, **kw)
    assert torch.equal(got, want)


def test_training_reaches_kept_units():
    model = make_decoder("qwen2")
    lays = attention_layouts(model)
    small = prune_heads(copy.deepcopy(model), {lays[0].name: [0], lays[1].name: [0, 1]}).train()
    x = token_batch(2)
    small(**x, labels=x["input_ids"]).loss.backward()
    assert small.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
