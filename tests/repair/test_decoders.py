"""Repair on decoder LLMs and ViT: q/k/v/o_proj, gate/up/down_proj and GPT-2's Conv1D (c_attn, c_proj, c_fc)
are refit, the kept rows are mapped right (a first-layer projection, whose inputs pruning does not change, starts
at zero error), the model gets closer to the dense one, and GPT-2's Conv1D modules come back as Conv1D."""

from __future__ import annotations

import copy

import pytest
import torch

import hap
from hap.text.lm import causal_lm_loss, lm_labels
from hap.units._sliced import is_conv1d
from tests._tiny_llm import logits, make_decoder, token_batch

pytest.importorskip("transformers")

FIRST = {"llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                   "model.layers.0.mlp.gate_proj"),
         "gpt2": ("transformer.h.0.attn.c_attn",)}
OUTPUTS = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_repair_refits_decoder_projections(arch):
    model = make_decoder(arch, inter=32)
    calib = [(b, lm_labels(b)) for b in (token_batch(s, n=6, t=12) for s in range(4))]
    sens = hap.sensitivity(model, causal_lm_loss, calib, units="heads,neurons", method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(params=0.2), tol=0.1)
    small = hap.prune(model, plan)
    held = [token_batch(s, n=6, t=12) for s in (20, 21)]

    def error(m):
        return float(sum((logits(m, x) - logits(model, x)).pow(2).sum() for x in held))

    before = error(small)
    reports = {}
    for strategy in ("lockstep", "restart"):
        fixed = copy.deepcopy(small)
        reports[strategy] = hap.repair(fixed, model, calib, plan=plan, strategy=strategy, progress=False)
        reports[strategy + "-model"] = fixed
    rep, fixed = reports["lockstep"], reports["lockstep-model"]
    assert not rep.skipped
    names = set(rep.layers)
    for i in range(2):
        for out in OUTPUTS[arch]:
            assert f"{'model.layers' if arch == 'llama' else 'transformer.h'}.{i}.{out}" in names
    for n in FIRST[arch]:
        assert rep.layers[n].before < 1e-10  # exact subset of the dense rows: mapping right
    assert all(r.after <= r.before + 1e-12 for r in rep.layers.values())
    assert error(fixed) < 0.8 * before
    assert hap.model_signature(fixed) == plan.pruned_signature
    if arch == "gpt2":
        assert is_conv1d(fixed.transformer.h[0].attn.c_attn) and is_conv1d(model.transformer.h[1].mlp.c_proj)
    for a, b in zip(fixed.state_dict().values(), reports["restart-model"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
