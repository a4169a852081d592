"""Query slots of grouped-query attention (``units="query_slots"``) on tiny random-init decoders.

A slot is query head ``j`` of every KV group with K/V kept, so the ground truth of any slot surgery is the
original model with those heads' ``o_proj`` columns zeroed (a head whose output is never read contributes
nothing; its K/V are still used by the other heads of its group). Checked with sdpa and eager attention, the
GQA layout left valid, plans through the whole library (JSON, ``hap.save``/``hap.load``) and an even plan
that plain ``transformers`` loads from :func:`hap.save_pretrained`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

import hap
from hap._hf import eager_attention
from hap.planning.types import PruningPlan
from hap.text.lm import causal_lm_loss, lm_labels
from hap.units import UnsupportedLayerError, attention_layouts, get_family, prune_query_slots, query_slot_units
from tests._tiny_llm import logits, make_decoder, token_batch

pytest.importorskip("transformers")

D = 8  # head_dim of every tiny decoder


def _zero_o_columns(model: nn.Module, remove: dict[str, list[int]]) -> nn.Module:
    """The reference: a copy whose removed query heads' ``o_proj`` columns are zero (heads counted as in HF)."""
    ref = copy.deepcopy(model)
    for name, slots in remove.items():
        att = ref.get_submodule(name)
        n_rep = att.num_key_value_groups
        n_kv = att.k_proj.out_features // D
        with torch.no_grad():
            for g in range(n_kv):
                for j in slots:
                    h = g * n_rep + j
                    att.o_proj.weight[:, h * D:(h + 1) * D] = 0
    return ref


def test_slot_is_one_query_head_of_every_kv_group():
    model = make_decoder("llama")  # 4 query / 2 KV heads: slot 1 = heads 1 and 3
    units = query_slot_units(model)
    assert [(u.group, u.index, u.kind) for u in units] == [
        (f"model.layers.{i}.self_attn", j, "query_slot") for i in range(2) for j in range(2)]
    u = units[1]
    got = {(s.param.removeprefix(u.group + "."), s.dim, s.role): s.indices for s in u.slices}
    rows = tuple(range(8, 16)) + tuple(range(24, 32))
    assert got == {("q_proj.weight", 0, "out"): rows, ("q_proj.bias", 0, "out"): rows,
                   ("o_proj.weight", 1, "in"): rows}
    assert get_family("query_slots").discover(model, None) == units
    assert get_family("heads").discover(model, None)[0].kind == "head"  # the default unit is unchanged


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_equals_o_columns_zeroed(arch, attn):
    model = make_decoder(arch)
    lays = attention_layouts(model)
    n_rep = lays[0].heads_per_unit
    remove = {lays[0].name: [n_rep - 1], lays[1].name: list(range(n_rep - 1))}  # layer 1 keeps one slot
    x = token_batch(1)
    ref = _zero_o_columns(model, remove)
    small = prune_query_slots(copy.deepcopy(model), remove)
    with eager_attention(model) if attn == "eager" else nullcontext():
        dense = logits(model, x)
    with eager_attention(ref) if attn == "eager" else nullcontext():
        want, want_positional = logits(ref, x), logits(ref, x["input_ids"])
    with eager_attention(small) if attn == "eager" else nullcontext():
        got, got_positional = logits(small, x), logits(small, x["input_ids"])
    assert (want - dense).abs().max() > 1e-3  # the heads mattered
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_positional, want_positional, rtol=1e-9, atol=1e-10)
    after = attention_layouts(small)
    n_kv = lays[0].num_heads
    for lay, before in zip(after, lays, strict=True):
        kept = n_rep - len(remove[lay.name])
        att = small.get_submodule(lay.name)
        assert (lay.style, lay.num_heads, lay.heads_per_unit, lay.query_heads) == ("gqa", n_kv, kept, n_kv * kept)
        assert att.num_key_value_groups == kept
        assert att.k_proj.weight.shape == model.get_submodule(before.name).k_proj.weight.shape  # K/V untouched
    slot0 = query_slot_units(model)[0]
    per_slot = sum(len(s.indices) * (32 if s.param.endswith("weight") else 1) for s in slot0.slices)
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == n - per_slot * sum(len(v) for v in remove.values())
    # a second pruning renumbers the kept slots (layer 0's slots 0..n_rep-2) and composes
    if n_rep > 2:
        again = prune_query_slots(copy.deepcopy(small), {lays[0].name: [0]})
        ref2 = _zero_o_columns(model, {**remove, lays[0].name: [0, n_rep - 1]})
        torch.testing.assert_close(logits(again, x), logits(ref2, x), rtol=1e-9, atol=1e-10)


def test_generation_with_kv_cache_matches_zeroed():
    model = make_decoder("llama")
    remove = {"model.layers.0.self_attn": [0], "model.layers.1.self_attn": [1]}
    prompt = token_batch(3, n=2, t=5, pad=False)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = _zero_o_columns(model, remove).generate(**prompt, **kw)
    got = prune_query_slots(copy.deepcopy(model), remove).generate(**prompt, **kw)
    assert torch.equal(got, want)


def test_refusals_name_the_problem():
    model = make_decoder("llama")
    with pytest.raises(ValueError, match="cannot remove all 2 query slots of 'model.layers.0.self_attn'"):
        prune_query_slots(model, {"model.layers.0.self_attn": [0, 1]})
    with pytest.raises(ValueError, match="has 2 query slots; slot 2 is out of range"):
        prune_query_slots(model, {"model.layers.0.self_attn": [2]})
    with pytest.raises(ValueError, match="'model.layers.0.mlp' is not a grouped-query attention module"):
        prune_query_slots(model, {"model.layers.0.mlp": [0]})
    assert model.model.layers[0].self_attn.q_proj.out_features == 32  # nothing was cut
    with pytest.raises(UnsupportedLayerError, match="'transformer.h.0.attn' is 'gpt2' attention.*units='heads'"):
        query_slot_units(make_decoder("gpt2"))
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="one query head per KV head.*units='heads'"):
        query_slot_units(transformers.LlamaForCausalLM(cfg))
    batches = [(b, lm_labels(b)) for b in (token_batch(0),)]
    with pytest.raises(ValueError, match="criterion 'michel' scores head units, not 'query_slot' units"):
        hap.sensitivity(model, causal_lm_loss, batches, units="query_slots", method="michel", progress=False)


def _even_plan(model: nn.Module) -> tuple[hap.Sensitivity, PruningPlan]:
    batches = [(b, lm_labels(b)) for b in (token_batch(s) for s in range(2))]
    sens = hap.sensitivity(model, causal_lm_loss, batches, units="query_slots,neurons", method="l1", progress=False)
    return sens, hap.plan(model, sens, hap.Target(params=0.25), allocation="even", tol=0.15)


def test_a_heads_target_counts_query_heads():
    """``Target(heads=t)`` on query slots removes ``t`` of the query heads (a slot is one query head of every
    KV group, so slots and query heads fall in the same share); K/V heads stay."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=D, intermediate_size=16)
    model = transformers.LlamaForCausalLM(cfg).eval()  # 4 slots per layer
    batches = [(b, lm_labels(b)) for b in (token_batch(s) for s in range(2))]
    sens = hap.sensitivity(model, causal_lm_loss, batches, units="query_slots", method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(heads=0.5), tol=0.01)
    small = hap.prune(model, plan)
    lays = attention_layouts(small)
    assert sum(la.query_heads for la in lays) == 8  # of 16 query heads
    assert all(la.num_heads == 2 for la in lays)  # KV heads untouched
    from hap.pipeline import RunConfig

    assert RunConfig.for_units("query_slots").target == {"heads": 0.5}


LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["hap"] = None  # any import of hap fails: the directory must load with transformers alone
    import torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    with torch.no_grad():
        print(json.dumps(model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))
""")


def test_plan_save_load_and_plain_transformers(tmp_path):
    model = make_decoder("llama")
    sens, plan = _even_plan(model)
    assert sens.settings["units"] == "query_slots,neurons"
    assert hap.Sensitivity.from_json(sens.to_json()).to_dict() == sens.to_dict()
    slots = [g for g in plan.groups if g.kind == "query_slot"]
    assert [g.name for g in slots] == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert len({len(g.removed) for g in slots}) == 1 and slots[0].removed  # even: one width per layer
    assert plan.params_removed > 0.1
    again = PruningPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    small = hap.prune(model, again)
    ref = _zero_o_columns(model, {g.name: g.removed for g in slots})
    ref = hap.prune(ref, PruningPlan.from_dict({**plan.to_dict(), "groups": [
        g.to_dict() for g in plan.groups if g.kind != "query_slot"]}))  # the neurons, as surgery cuts them
    x = token_batch(4)
    torch.testing.assert_close(logits(small, x), logits(ref, x), rtol=1e-9, atol=1e-10)
    # hap.save -> hap.load replays the slots from plan.json alone
    hap.save(small, plan, tmp_path / "saved")
    loaded = hap.load(tmp_path / "saved", make_decoder("llama", seed=1))
    torch.testing.assert_close(logits(loaded, x), logits(small, x), rtol=0, atol=0)
    # an even plan is one Hugging Face config: num_attention_heads = KV heads x remaining slots
    kept = 2 - len(slots[0].removed)
    hap.save_pretrained(small, plan, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2 * kept, 2, D)
    ids = token_batch(5, pad=False)["input_ids"]
    res = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "hf"), json.dumps(ids.tolist())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    torch.testing.assert_close(got, logits(small, ids), rtol=1e-10, atol=1e-10)



def test_slots_and_kv_groups_compose():
    """Slots then whole KV groups (``units="heads"``) on the same model: still the zeroed original."""
    import transformers

    from hap.units import prune_heads

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, head_dim=D, intermediate_size=16)
    model = transformers.LlamaForCausalLM(cfg).double().eval()  # n_rep 3: heads 0-2 read KV 0, heads 3-5 KV 1
    x = {"input_ids": torch.randint(0, 40, (2, 6))}
    small = prune_query_slots(copy.deepcopy(model), {"model.layers.0.self_attn": [1]})  # heads 1 and 4
    small = prune_heads(small, {"model.layers.0.self_attn": [0], "model.layers.1.self_attn": [0, 1]})
    assert [u.group for u in query_slot_units(small)] == ["model.layers.0.self_attn"] * 2  # layer 1 is headless
    assert small.model.layers[0].self_attn.num_key_value_groups == 2
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in ((0, [0, 1, 2, 4]), (1, range(6))):
            for h in heads:
                ref.model.layers[layer].self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
    torch.testing.assert_close(logits(small, x), logits(ref, x), rtol=1e-9, atol=1e-10)
