"""hap.save_pretrained: a pruned decoder with the same widths in every layer becomes a directory plain
``transformers`` loads (checked in a subprocess where importing hap is impossible); per-layer widths and
sizes a config cannot carry are refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import hap
from hap.text.lm import causal_lm_loss, lm_labels
from hap.units import attention_layouts, mlp_layouts, prune_heads, prune_neurons
from tests._tiny_llm import DECODERS, logits, make_decoder, token_batch

pytest.importorskip("transformers")

UNITS = {"llama": "heads,neurons", "qwen2": "heads,neurons", "mistral": "neurons", "gpt2": "neurons"}

LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["hap"] = None  # any import of hap fails: the directory must load with transformers alone
    import torch, transformers
    out = {}
    for arch, d in json.loads(sys.argv[1]).items():
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        ids = torch.tensor(json.loads(sys.argv[2]))
        with torch.no_grad():
            out[arch] = model(input_ids=ids).logits.tolist()
    print(json.dumps(out))
""")


def _plan(model: nn.Module, units: str, target: float = 0.25):
    batches = [(b, lm_labels(b)) for b in (token_batch(s) for s in range(2))]
    sens = hap.sensitivity(model, causal_lm_loss, batches, units=units, method="l1", progress=False)
    return hap.plan(model, sens, hap.Target(params=target), allocation="even", tol=0.15)


def test_even_plans_load_with_plain_transformers(tmp_path):
    dirs, small = {}, {}
    for arch in DECODERS:
        model = make_decoder(arch)
        plan = _plan(model, UNITS[arch])
        small[arch] = hap.prune(model, plan)
        att = attention_layouts(small[arch])
        assert len({lay.num_heads for lay in att}) == 1 and len({lay.width for lay in mlp_layouts(small[arch])}) == 1
        assert plan.params_removed > 0.1
        dirs[arch] = str(hap.save_pretrained(small[arch], plan, tmp_path / arch))
        cfg = json.loads((tmp_path / arch / "config.json").read_text())
        width = mlp_layouts(small[arch])[0].width
        assert cfg["n_inner" if arch == "gpt2" else "intermediate_size"] == width
        if arch in ("llama", "qwen2"):
            assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
                att[0].query_heads, att[0].num_heads, 8)
        assert (tmp_path / arch / "plan.json").is_file()
    ids = token_batch(5, pad=False)["input_ids"]
    res = subprocess.run([sys.executable, "-c", LOADER, json.dumps(dirs), json.dumps(ids.tolist())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for arch in DECODERS:
        want = logits(small[arch], ids)
        torch.testing.assert_close(torch.tensor(got[arch], dtype=want.dtype), want, rtol=1e-10, atol=1e-10)


def test_widths_that_differ_per_layer_are_refused_by_name(tmp_path):
    model = make_decoder("llama")
    small = prune_neurons(model, {"model.layers.0.mlp": [0, 1, 2]})
    with pytest.raises(ValueError, match="widths differ per layer.*'model.layers.0.mlp' 21.*allocation='even'"):
        hap.save_pretrained(small, None, tmp_path / "x")
    small = prune_heads(make_decoder("llama"), {"model.layers.1.self_attn": [0]})
    with pytest.raises(ValueError, match="attention widths differ per layer"):
        hap.save_pretrained(small, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_sizes_a_config_cannot_carry_are_refused(tmp_path):
    model = make_decoder("gpt2")
    small = prune_heads(model, {f"transformer.h.{i}.attn": [0] for i in range(2)})
    with pytest.raises(ValueError, match="derives a size its config cannot carry"):
        hap.save_pretrained(small, None, tmp_path / "x")
    with pytest.raises(ValueError, match="not a Hugging Face PreTrainedModel"):
        hap.save_pretrained(nn.Linear(2, 2), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_directory_is_replaced_whole(tmp_path):
    model = make_decoder("llama")
    plan = _plan(model, "neurons")
    small = hap.prune(model, plan)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "stale.txt").write_text("old")
    hap.save_pretrained(small, plan, d)
    assert not (d / "stale.txt").exists() and (d / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind
    with pytest.raises(ValueError, match="not the result of this plan"):
        hap.save_pretrained(make_decoder("llama"), plan, d)


@pytest.mark.parametrize("target", [0.15, 0.45])
def test_even_allocation_gives_equal_widths_at_any_target(target):
    model = make_decoder("llama", inter=40)
    batches = [(b, lm_labels(b)) for b in (token_batch(s) for s in range(2))]
    sens = hap.sensitivity(model, causal_lm_loss, batches, units="heads,neurons", method="random", progress=False)
    plan = hap.plan(model, sens, hap.Target(params=target), allocation="even", tol=0.1)
    by_kind: dict[str, set[int]] = {}
    for g in plan.groups:
        by_kind.setdefault(g.kind, set()).add(len(g.removed))
    assert all(len(v) == 1 for v in by_kind.values()), plan.summary()
    assert plan.allocation == "even" and abs(plan.params_removed - target) <= 0.1
    uniform = hap.plan(model, sens, hap.Target(params=target), allocation="uniform", tol=0.1)
    assert abs(uniform.params_removed - target) <= abs(plan.params_removed - target) + 1e-12  # finer steps
