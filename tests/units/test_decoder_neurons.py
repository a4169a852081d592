"""Gated MLP neurons (Llama / Qwen2 / Mistral) and GPT-2's Conv1D MLP, alone and jointly with heads.

Surgery is checked against the masked original (removed neurons' down-projection inputs zeroed); the joint
plan goes through hap.sensitivity (causal-LM loss) -> hap.plan -> hap.prune -> hap.save / hap.load.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hap
from hap.text.lm import causal_lm_loss, lm_labels
from hap.units import mask_heads, mask_neurons, mlp_layouts, neuron_units, prune_neurons
from tests._tiny_llm import DECODERS, logits, make_decoder, token_batch

pytest.importorskip("transformers")


def test_gated_unit_is_gate_and_up_rows_and_a_down_column():
    model = make_decoder("llama")
    u = neuron_units(model)[24 + 5]
    assert (u.group, u.index, u.kind) == ("model.layers.1.mlp", 5, "neuron")
    assert [(s.param.removeprefix(u.group + "."), s.dim, s.indices, s.role) for s in u.slices] == [
        ("gate_proj.weight", 0, (5,), "out"), ("up_proj.weight", 0, (5,), "out"), ("down_proj.weight", 1, (5,), "in")]


def test_gpt2_unit_is_a_conv1d_column_and_row():
    model = make_decoder("gpt2")
    u = neuron_units(model)[3]
    assert [(s.param, s.dim, s.indices, s.role) for s in u.slices] == [
        ("transformer.h.0.mlp.c_fc.weight", 1, (3,), "out"), ("transformer.h.0.mlp.c_fc.bias", 0, (3,), "out"),
        ("transformer.h.0.mlp.c_proj.weight", 0, (3,), "in")]
    # the attention's c_proj (a Conv1D beside c_attn) is not mistaken for a feed-forward block
    assert [lay.name for lay in mlp_layouts(model)] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


@pytest.mark.parametrize("arch", DECODERS)
def test_pruned_neurons_equal_masked(arch):
    model = make_decoder(arch)
    lays = mlp_layouts(model)
    last = 23 if arch == "gpt2" else 24  # a gated block may lose every neuron; GPT-2's Conv1D keeps one
    remove = {lays[0].name: [0, 5, 7, 23], lays[1].name: list(range(last))}
    x = token_batch(4)
    dense = logits(model, x)
    with mask_neurons(model, remove):
        want = logits(model, x)
    small = prune_neurons(copy.deepcopy(model), remove)
    assert (want - dense).abs().max() > 1e-3
    torch.testing.assert_close(logits(small, x), want, rtol=1e-9, atol=1e-10)
    assert [lay.width for lay in mlp_layouts(small)] == [20, 24 - last]
    if arch == "gpt2":
        with pytest.raises(ValueError, match="at least one neuron must stay"):
            prune_neurons(small, {lays[1].name: [0]})
    else:
        assert small.get_submodule(lays[1].name).intermediate_size == 0


def _batches(n: int = 3):
    return [(b, lm_labels(b)) for b in (token_batch(s) for s in range(n))]


@pytest.mark.parametrize("arch", DECODERS)
def test_joint_heads_and_neurons_plan_prune_save_load(arch, tmp_path):
    model = make_decoder(arch)
    sens = hap.sensitivity(model, causal_lm_loss, _batches(), units="heads,neurons", method="hap-fisher",
                           progress=False, max_samples=6)
    assert {u.unit.kind for u in sens.units} == {"head", "neuron"}
    plan = hap.plan(model, sens, hap.Target(params=0.25), allocation="global", rank_by="score_per_param", tol=0.05)
    assert abs(plan.params_removed - 0.25) <= 0.05
    heads = {g.name: g.removed for g in plan.groups if g.kind == "head" and g.removed}
    neurons = {g.name: g.removed for g in plan.groups if g.kind == "neuron" and g.removed}
    assert neurons, plan.summary()
    small = hap.prune(model, plan)
    x = token_batch(9)
    with mask_heads(model, heads), mask_neurons(model, neurons):
        want = logits(model, x)
    torch.testing.assert_close(logits(small, x), want, rtol=1e-9, atol=1e-10)
    hap.save(small, plan, tmp_path / "run")
    loaded = hap.load(tmp_path / "run", make_decoder(arch, seed=3))
    torch.testing.assert_close(logits(loaded, x), logits(small, x), rtol=0, atol=0)


def test_causal_loss_drives_every_criterion():
    model = make_decoder("llama")
    for method in ("l1", "taylor", "obs", "random"):
        sens = hap.sensitivity(model, causal_lm_loss, _batches(2), units="heads,neurons", method=method,
                               progress=False, max_samples=4)
        plan = hap.plan(model, sens, hap.Target(params=0.2), tol=0.06)
        small = hap.prune(model, plan)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def _as_linears(model):
    """A copy with every GPT-2 Conv1D replaced by the nn.Linear it equals (weight transposed)."""
    from hap.units._sliced import is_conv1d

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if is_conv1d(m):
            lin = torch.nn.Linear(m.nx, m.nf, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def test_obs_on_gpt2_conv1d_equals_obs_on_the_equivalent_linears():
    """OBS reads GPT-2's Conv1D consumers (c_proj rows) exactly as it reads the equivalent Linear's columns."""
    from hap.units import ParamSlice, Unit, neuron_units

    model = make_decoder("gpt2")
    units = neuron_units(model)
    conv1d = {"c_fc.weight", "c_proj.weight"}
    flipped = [Unit(u.group, u.index, tuple(ParamSlice(s.param, 1 - s.dim if s.param.rpartition(".mlp.")[2] in conv1d
                                                         else s.dim, s.indices, s.role) for s in u.slices), u.kind)
               for u in units]
    got = hap.sensitivity(model, causal_lm_loss, _batches(2), units=units, method="obs", progress=False)
    want = hap.sensitivity(_as_linears(model), causal_lm_loss, _batches(2), units=flipped, method="obs",
                           progress=False)
    assert (got.ranking_scores("signed") > 0).all()
    np.testing.assert_allclose(got.ranking_scores("signed"), want.ranking_scores("signed"), rtol=1e-8)
