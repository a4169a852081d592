"""ViT (transformers v5 ViTForImageClassification): attention heads and MLP neurons on a tiny random model.

Pruned == masked for heads, neurons and both (a layer losing every head included), the whole
sensitivity -> plan -> prune -> save / load path on image batches, and a from_pretrained round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hap
from hap.units import attention_layouts, mask_heads, mask_neurons, mlp_layouts, prune_heads, prune_neurons
from hap.units.decoder import HeadlessDecoderAttention
from tests._tiny_llm import logits, make_vit

transformers = pytest.importorskip("transformers")


def _images(seed: int, n: int = 5) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_vit_layouts():
    model = make_vit()
    assert [(lay.name, lay.num_heads, lay.head_size, lay.heads_per_unit) for lay in attention_layouts(model)] == [
        (f"vit.layers.{i}.attention", 4, 4, 1) for i in range(2)]
    assert [(lay.name, lay.adapter.style, lay.width) for lay in mlp_layouts(model)] == [
        (f"vit.layers.{i}.mlp", "fc", 24) for i in range(2)]


@pytest.mark.parametrize("what", ["heads", "neurons", "both"])
def test_vit_pruned_equals_masked(what):
    model = make_vit()
    att, mlp = attention_layouts(model), mlp_layouts(model)
    heads = {att[0].name: [1, 2], att[1].name: [0, 1, 2, 3]} if what != "neurons" else {}
    neurons = {mlp[0].name: [0, 3, 9], mlp[1].name: list(range(24))} if what != "heads" else {}
    x = _images(1)
    dense = logits(model, x)
    with mask_heads(model, heads), mask_neurons(model, neurons):
        want = logits(model, x)
    small = prune_neurons(prune_heads(copy.deepcopy(model), heads), neurons)
    assert (want - dense).abs().max() > 1e-3
    torch.testing.assert_close(logits(small, x), want, rtol=1e-9, atol=1e-10)
    if heads:
        assert isinstance(small.get_submodule(att[1].core), HeadlessDecoderAttention)
        assert small.get_submodule(att[0].core).num_attention_heads == 2
        assert [lay.num_heads for lay in attention_layouts(small)] == [2, 0]  # a headless layer is still read


def test_vit_sensitivity_plan_prune_save_load_and_from_pretrained(tmp_path):
    model = make_vit()
    batches = [(_images(s), torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(s)))
               for s in range(3)]
    sens = hap.sensitivity(model, lambda out, y: F.cross_entropy(out.logits, y), batches, units="heads,neurons",
                           method="hap-fisher", progress=False, max_samples=6)
    plan = hap.plan(model, sens, hap.Target(params=0.3), allocation="even", tol=0.1)
    small = hap.prune(model, plan)
    assert len({lay.num_heads for lay in attention_layouts(small)}) == 1
    assert len({lay.width for lay in mlp_layouts(small)}) == 1
    x = _images(7)
    hap.save(small, plan, tmp_path / "run")
    loaded = hap.load(tmp_path / "run", make_vit(seed=4))
    torch.testing.assert_close(logits(loaded, x), logits(small, x), rtol=0, atol=0)
    hap.save_pretrained(small, plan, tmp_path / "hf")
    plain = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(plain, x), logits(small, x), rtol=1e-12, atol=1e-12)


def test_memory_format_probe_takes_a_hugging_face_classifier():
    """VisionTask's channels_last probe (memory_format="auto", the default) runs on a ViT's .logits output."""
    from hap.train.tasks import pick_memory_format

    model = make_vit()
    assert pick_memory_format(model, _images(2, n=4), torch.tensor([0, 1, 2, 0]), reps=1) in ("contiguous",
                                                                                            "channels_last")
