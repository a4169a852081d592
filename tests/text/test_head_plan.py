"""Head plans through the channel machinery: hap.sensitivity -> hap.plan(Target(heads=F)) -> hap.prune -> save/load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hap
from hap.units.heads import mask_heads

transformers = pytest.importorskip("transformers")


def make_model(arch: str, layers: int = 3, heads: int = 4, seed: int = 0):
    """A tiny random classifier, float64, eval mode, large init so every head matters."""
    torch.manual_seed(seed)
    common = dict(vocab_size=40, num_labels=2, max_position_embeddings=16, initializer_range=0.5)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=16, num_attention_heads=heads, num_hidden_layers=layers,
                                      intermediate_size=32, **common)
        model = transformers.BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = transformers.RobertaConfig(hidden_size=16, num_attention_heads=heads, num_hidden_layers=layers,
                                         intermediate_size=32, pad_token_id=1, **common)
        model = transformers.RobertaForSequenceClassification(cfg)
    else:
        cfg = transformers.DistilBertConfig(dim=16, n_heads=heads, n_layers=layers, hidden_dim=32, **common)
        model = transformers.DistilBertForSequenceClassification(cfg)
    return model.double().eval()


def batches(n_batches: int = 2, n: int = 6, t: int = 7):
    out = []
    for b in range(n_batches):
        gen = torch.Generator().manual_seed(b)
        mask = torch.ones(n, t, dtype=torch.long)
        mask[0, t - 2 :] = 0
        x = {"input_ids": torch.randint(3, 40, (n, t), generator=gen), "attention_mask": mask}
        out.append((x, torch.randint(0, 2, (n,), generator=gen)))
    return out


def loss_fn(out, y):
    return F.cross_entropy(out.logits, y)


def _removed(p: hap.PruningPlan) -> dict[str, list[int]]:
    return {g.name: g.removed for g in p.groups if g.removed}


@pytest.mark.parametrize("method", ["hap", "michel", "l1", "taylor", "random"])
def test_three_lines_as_for_channels(method):
    """sensitivity(units='heads') -> plan(Target(heads=)) -> prune, no example inputs given: the pruned
    model computes what the masked one does, with fewer parameters."""
    model = make_model("bert")
    data = batches()
    sens = hap.sensitivity(model, loss_fn, data, units="heads", method=method, max_samples=16, progress=False)
    plan = hap.plan(model, sens, hap.Target(heads=0.5))
    assert all(g.kind == "head" for g in plan.groups) and plan.heads_removed == 0.5
    small = hap.prune(model, plan)
    assert hap.count_params(small) == plan.achieved["params"] < plan.base["params"]
    assert plan.params_removed > 0 and plan.macs_removed > 0
    x = data[0][0]
    with torch.no_grad(), mask_heads(model, _removed(plan)):
        ref = model(**x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, ref, rtol=1e-10, atol=1e-10)
    assert copy.deepcopy(model).state_dict().keys() == model.state_dict().keys()  # base untouched


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_planner_hits_head_count_exactly(fraction, allocation):
    model = make_model("bert", layers=3, heads=4)  # 12 heads: every fraction here is a whole count
    rng = np.random.default_rng(0)
    sens = hap.sensitivity(model, loss_fn, batches(1), units="heads", method="random", progress=False)
    for u in sens.units:
        u.score = float(rng.normal())
    plan = hap.plan(model, sens, hap.Target(heads=fraction), allocation=allocation)
    removed = sum(len(g.removed) for g in plan.groups)
    assert removed == round(fraction * 12)
    kept = [len(g.kept) for g in plan.groups]
    assert min(kept) >= 1  # the planner's limit: the best head of a layer stays
    if allocation == "uniform":
        assert max(kept) - min(kept) <= 1


def test_global_plan_empties_a_layer_down_to_its_best_head():
    """With the least sensitive heads all in layer 0, global ranking takes that layer down to the limit
    (one head: the most sensitive of it) and then continues elsewhere; max_layer_ratio can hold it higher."""
    model = make_model("bert", layers=3, heads=4)
    sens = hap.sensitivity(model, loss_fn, batches(1), units="heads", method="l1", progress=False)
    for u in sens.units:
        layer = int(u.group.split(".layer.")[1].split(".")[0])
        u.score = (layer * 10.0 if layer else -10.0) + u.index  # layer 0 lowest; head 3 its best
    plan = hap.plan(model, sens, hap.Target(heads=5 / 12), allocation="global")
    g0, g1, g2 = plan.groups
    assert g0.kept == [3] and g0.removed == [0, 1, 2]
    assert g1.removed == [0, 1] and not g2.removed
    capped = hap.plan(model, sens, hap.Target(heads=5 / 12), max_layer_ratio=0.5, allocation="global")
    assert [len(g.kept) for g in capped.groups] == [2, 2, 3]
    small = hap.prune(model, plan)
    assert [lay.num_heads for lay in hap.attention_layouts(small)] == [1, 2, 4]


def test_head_plan_json_round_trip(tmp_path):
    model = make_model("bert")
    sens = hap.sensitivity(model, loss_fn, batches(1), units="heads", method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(heads=0.5))
    path = plan.save(tmp_path / "plan.json")
    again = hap.PruningPlan.load(path)
    assert again.to_dict() == plan.to_dict()
    assert [g.kind for g in again.groups] == ["head"] * 3
    assert again.target.kind == "heads" and again.achieved_fraction() == 0.5


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_save_load_gives_identical_outputs(arch, tmp_path):
    model = make_model(arch)
    data = batches()
    sens = hap.sensitivity(model, loss_fn, data, units="heads", method="michel", progress=False)
    plan = hap.plan(model, sens, hap.Target(heads=0.5))
    small = hap.prune(model, plan)
    with torch.no_grad():  # "fine-tuned" weights: load must bring back these, not the base's
        for p in small.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hap.save(small, plan, tmp_path / "run")
    fresh = make_model(arch, seed=123)  # other weights, same architecture
    loaded = hap.load(tmp_path / "run", fresh)
    x = data[1][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, small(**x).logits, rtol=0, atol=0)
    assert [lay.num_heads for lay in hap.attention_layouts(loaded)] == [
        lay.num_heads for lay in hap.attention_layouts(small)
    ]
    with pytest.raises(ValueError, match="not the architecture"):
        hap.load(tmp_path / "run", make_model(arch, layers=2))
