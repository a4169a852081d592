"""hap.prune: physically pruned models compute exactly what the masked model computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hap
import hap.models as zoo
from hap.implant import ImplantedConv, ScatterImplantedConv
from hap.planning import GroupPlan

from ._plan_helpers import ImplantNet, example, masked, randomize, scores  # noqa: F401
from .conftest import make_tiny


def _zoo(name: str) -> nn.Module:
    return randomize(zoo.create(name, num_classes=5, in_channels=1).double())


def _model(name: str) -> nn.Module:
    if name == "implantnet":
        return randomize(ImplantNet().double())
    if name in ("residual", "concat_dw", "mlp"):
        return make_tiny(name)[0].eval()
    if name.startswith("tiny_"):
        from hap.models import tiny

        cls = {"tiny_convbn": tiny.TinyConvBN, "tiny_residual": tiny.TinyResidual,
               "tiny_concat": tiny.TinyConcatDepthwise}[name]
        return randomize(cls().double())
    return _zoo(name)


CASES = ["implantnet", "residual", "concat_dw", "mlp", "tiny_convbn", "tiny_residual", "tiny_concat", "resnet20",
         "preresnet29", "vgg16_bn"]


def _plan(model, x, implant, fraction, target=0.5, seed=0):
    sens = scores(model, x, seed=seed)
    p = hap.plan(model, sens, hap.Target(channels=target), implant=implant, implant_fraction=fraction,
                 example_inputs=x[:1], implant_cost=10.0 if implant == "lowrank" else 0.25, tol=0.3)
    return sens, p


@pytest.mark.parametrize("name", CASES)
def test_removal_equals_masked_model(name):
    model = _model(name)
    x = example(model, side=32 if name == "vgg16_bn" else 8)
    sens, p = _plan(model, x, None, 0.0)
    assert any(g.removed for g in p.groups)
    small = hap.prune(model, p)
    with torch.no_grad():
        ref = masked(model, sens, p.groups, zero_implanted=False)(x)
        out = small(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert hap.count_params(small) == p.achieved["params"] < hap.count_params(model)


@pytest.mark.parametrize("name", ["implantnet", "tiny_convbn", "resnet20", "preresnet29"])
def test_zero_pointwise_implant_equals_masked_filters(name):
    model = _model(name)
    x = example(model)
    sens, p = _plan(model, x, "pointwise", 0.4)
    assert any(g.implanted for g in p.groups)
    small = hap.prune(model, p)
    assert any(isinstance(m, ImplantedConv) for m in small.modules())
    with torch.no_grad():
        ref = masked(model, sens, p.groups, zero_implanted=True)(x)
        out = small(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert hap.count_params(small) == p.achieved["params"]


@pytest.mark.parametrize("name", ["implantnet", "resnet20", "preresnet29"])
def test_full_rank_lowrank_implant_reproduces_unpruned_channels(name):
    """A full-rank implant is the original filters: only the removed channels differ from the original."""
    model = _model(name)
    x = example(model)
    sens, p = _plan(model, x, "lowrank", 0.4)
    lowrank = [g for g in p.groups if g.implant == "lowrank"]
    assert lowrank
    for g in lowrank:
        g.rank = len(g.implanted)  # n filters of C_in*k*k >= n weights: rank n is full
    small = hap.prune(model, p)
    with torch.no_grad():
        ref = masked(model, sens, p.groups, zero_implanted=False)(x)
        out = small(x)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("rank", [None, 1, 2])
def test_concat_layout_equals_scatter_layout(rank):
    """The permuted consumers + concat compute what writing into a zero tensor at original positions does.

    Implanted channels interleave with kept ones (and the implants are not exact), so a permutation that
    misplaces any channel, BN entry or consumer column (behind a concat, behind a flatten) shows.
    """
    model = _model("implantnet")
    x = example(model)
    _, p = _plan(model, x, "pointwise", 0.4)
    for g in p.groups:  # only the groups assigned below carry implants
        g.removed, g.implanted = sorted(g.removed + g.implanted), []
    assign = {"stem": ([1, 4], [0, 3], [2]), "a": ([1, 4], [0, 3, 5], [2]), "c": ([2, 3], [0, 5], [1, 4])}
    for g in p.groups:
        if g.name in assign:
            g.kept, g.implanted, g.removed = (list(v) for v in assign[g.name])
            g.implant, g.rank = ("pointwise", None) if rank is None else ("lowrank", rank)
    fast = hap.prune(model, p)
    slow = hap.prune(model, p, layout="scatter")
    if rank is None:  # non-zero pointwise implants: the least-squares fit is layout-independent
        res_fast = hap.calibrate(fast, model, p, [x])
        res_slow = hap.calibrate(slow, model, p, [x])
        assert sorted(res_fast) == ["a", "c", "stem"]
        assert res_fast == pytest.approx(res_slow, rel=1e-6)
    assert sum(isinstance(m, ScatterImplantedConv) for m in slow.modules()) == 3
    assert not any(isinstance(m, ScatterImplantedConv) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-9, atol=1e-10)


def test_input_model_untouched_unless_inplace():
    model = _model("implantnet")
    x = example(model)
    _, p = _plan(model, x, "pointwise", 0.4)
    before = copy.deepcopy(model.state_dict())
    small = hap.prune(model, p)
    assert small is not model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    same = hap.prune(model, p, inplace=True)
    assert same is model and hap.count_params(model) == p.achieved["params"]


def test_plan_from_another_model_is_refused():
    model = _model("implantnet")
    x = example(model)
    _, p = _plan(model, x, None, 0.0)
    other = _model("tiny_convbn")
    with pytest.raises(ValueError, match="another model"):
        hap.prune(other, p)


def test_implant_on_residual_group_is_refused():
    """Residual groups (several producers) never carry implants: the planner removes, surgery refuses."""
    model = _model("resnet20")
    x = example(model)
    sens, p = _plan(model, x, "pointwise", 0.4)
    residual = next(g for g in p.groups if g.name == "conv1")
    assert not residual.implanted and "several layers" in residual.note
    kept = list(range(residual.size))
    residual.kept, residual.implanted, residual.removed = kept[2:], kept[:2], []
    residual.implant = "pointwise"
    with pytest.raises(ValueError, match="residual add"):
        hap.prune(model, p)


def test_pruned_model_trains():
    """Implanted models are ordinary modules: gradients reach the implant and the kept filters."""
    model = _model("implantnet")
    x = example(model)
    _, p = _plan(model, x, "pointwise", 0.4)
    small = hap.prune(model, p).train()
    small(x).sum().backward()
    implants = [m for m in small.modules() if isinstance(m, ImplantedConv)]
    assert implants and all(m.implant.weight.grad is not None for m in implants)


def test_prune_validates_layout():
    model = _model("implantnet")
    x = example(model)
    _, p = _plan(model, x, None, 0.0)
    with pytest.raises(ValueError, match="layout"):
        hap.prune(model, p, layout="gather")
    bad = copy.deepcopy(p)
    bad.groups.append(GroupPlan("nope", 2, [0], [], [1]))
    with pytest.raises(ValueError, match="does not have"):
        hap.prune(model, bad)


def test_three_line_public_face():
    """sens = hap.sensitivity(...); plan = hap.plan(model, sens, Target); small = hap.prune(model, plan)."""
    torch.manual_seed(0)
    model = randomize(ImplantNet())
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    sens = hap.sensitivity(model, nn.functional.cross_entropy, batches, max_samples=64, progress=False)
    plan = hap.plan(model, sens, hap.Target(params=0.4), tol=0.05)
    small = hap.prune(model, plan)
    assert sens.method == "hap" and abs(plan.params_removed - 0.4) <= 0.05
    assert hap.count_params(small) == plan.achieved["params"]
    assert small(batches[0][0]).shape == (8, 3)
