"""hap.plan: targets met on the measured pruned model, limits respected, plans as JSON data."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import hap
import hap.models as zoo
from hap.implant import ImplantedConv, implant_params
from hap.latency_table import predict_ms
from hap.models.tiny import TinyConcatDepthwise
from hap.models.vgg import VGG, VGG16_CONFIG
from hap.planning import GroupPlan, PlanError, PruningPlan, Target

from ._latency_helpers import synthetic_for, tiny
from ._plan_helpers import example, randomize, scores  # noqa: F401


def _net(name: str):
    """(model, one example input) in float32, small inputs."""
    if name == "concat_dw":
        model = randomize(TinyConcatDepthwise(in_channels=1, width=64, image_size=8))
        return model, example(model, n=1)
    if name == "vgg16_bn/4":  # VGG-16-BN's 13 conv+BN layers at a quarter of the width: same structure, 16x faster
        config = [c // 4 if isinstance(c, int) else c for c in VGG16_CONFIG]
        model = randomize(VGG(config, num_classes=10, in_channels=1, batch_norm=True))
        return model, example(model, n=1, side=32)
    model = randomize(zoo.create(name, num_classes=10, in_channels=1))
    return model, example(model, n=1, side=32 if name.startswith("vgg") else 16)


_CACHE: dict[str, tuple] = {}


def _setup(name: str):
    """Model, input and random scores, built once per model for the whole module."""
    if name not in _CACHE:
        model, x = _net(name)
        _CACHE[name] = (model, x, scores(model, x.repeat(2, *[1] * (x.dim() - 1))))
    return _CACHE[name]


# ------------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "preresnet29", "vgg16_bn/4", "concat_dw"])
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_target_met_within_one_percent(name, kind):
    model, x, sens = _setup(name)
    target = Target(**{kind: 0.5})
    p = hap.plan(model, sens, target, example_inputs=x)
    assert abs(p.achieved_fraction() - 0.5) <= 0.01
    # achieved numbers are those of the real pruned model, implants included
    small = hap.prune(model, p)
    assert hap.count_params(small) == p.achieved["params"]
    assert hap.count_macs(small, x) == p.achieved["macs"]
    assert p.base == {"params": hap.count_params(model), "macs": hap.count_macs(model, x)}
    for g in p.groups:
        g.validate()
        assert len(g.removed) + len(g.implanted) <= math.floor(0.95 * g.size)


@pytest.mark.parametrize("implant", ["pointwise", "lowrank", None])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_target_met_with_each_implant_and_allocation(implant, allocation):
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(params=0.4), implant=implant, implant_fraction=0.2, allocation=allocation,
                 example_inputs=x)
    assert abs(p.params_removed - 0.4) <= 0.01
    small = hap.prune(model, p)
    assert hap.count_params(small) == p.achieved["params"]
    n_impl = sum(len(g.implanted) for g in p.groups)
    assert (n_impl > 0) == (implant is not None)
    assert sum(isinstance(m, ImplantedConv) for m in small.modules()) == sum(1 for g in p.groups if g.implanted)


def test_channels_target_counts_implanted_as_pruned():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(channels=0.3), implant_fraction=0.2, example_inputs=x)
    pruned = sum(len(g.removed) + len(g.implanted) for g in p.groups)
    assert abs(pruned / sum(g.size for g in p.groups) - 0.3) <= 0.01
    assert p.channels_removed == pytest.approx(pruned / sum(g.size for g in p.groups))


def test_implant_cost_is_in_the_budget():
    """With implants the same parameter target needs more channels pruned: the implants are paid for."""
    model, x, sens = _setup("resnet20")
    plain = hap.plan(model, sens, Target(params=0.5), implant=None, example_inputs=x)
    implanted = hap.plan(model, sens, Target(params=0.5), implant_fraction=0.3, example_inputs=x)
    assert implanted.channels_removed > plain.channels_removed
    assert abs(implanted.params_removed - 0.5) <= 0.01


def test_lowrank_rank_within_cost():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(params=0.5), implant="lowrank", implant_fraction=0.3, implant_cost=0.3,
                 example_inputs=x)
    small = hap.prune(model, p)
    mods = dict(small.named_modules())
    lowrank = [g for g in p.groups if g.implant == "lowrank"]
    assert lowrank
    for g in lowrank:
        m = mods[g.name]
        n, cin, k2 = m.n_implanted, m.in_channels, 9
        assert implant_params("lowrank", n, cin, k2, g.rank) <= 0.3 * n * cin * k2
        assert implant_params("lowrank", n, cin, k2, g.rank + 1) > 0.3 * n * cin * k2 or g.rank == n


def test_residual_groups_get_no_implant():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(params=0.5), implant_fraction=0.3, example_inputs=x)
    by = {g.name: g for g in p.groups}
    for name in ("conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0"):  # the residual streams
        assert not by[name].implanted and by[name].note
    assert any(g.implanted for g in p.groups if g.name.endswith(".conv1") and g.name != "conv1")


# ------------------------------------------------------------------------------------------------
# limits


def test_uniform_allocation_prunes_every_group_alike():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(channels=0.5), implant=None, allocation="uniform", example_inputs=x)
    ratios = [len(g.removed) / g.size for g in p.groups]
    assert max(ratios) - min(ratios) <= 1 / min(g.size for g in p.groups) + 1e-9


def test_limits_round_to_max_ratio_keep_best():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(params=0.3), implant_fraction=0.2, round_to=4, max_layer_ratio=0.6,
                 example_inputs=x, tol=0.02)
    ranking = sens.ranking_scores("signed")
    score = {(u.group, u.index): ranking[i] for i, u in enumerate(sens.units)}
    for g in p.groups:
        width = len(g.kept) + len(g.implanted)
        assert width % 4 == 0 or width == g.size
        assert len(g.removed) + len(g.implanted) <= math.floor(0.6 * g.size)
        best = max(range(g.size), key=lambda c, g=g: (score[(g.name, c)], -c))
        assert best in g.kept
        if g.removed and g.kept:  # removed are the least sensitive
            assert max(score[(g.name, c)] for c in g.removed) <= min(score[(g.name, c)] for c in g.kept)


def test_exclude_leaves_group_untouched():
    model, x, sens = _setup("resnet20")
    p = hap.plan(model, sens, Target(params=0.3), exclude=["layer1.0.conv1", model.layer3[0].conv1],
                 example_inputs=x)
    by = {g.name: g for g in p.groups}
    for name in ("layer1.0.conv1", "layer3.0.conv1"):
        assert len(by[name].kept) == by[name].size and "excluded" in by[name].note
    assert p.settings["exclude"] == ["layer1.0.conv1", "layer3.0.conv1"]


def test_sign_handling_changes_the_ranking():
    model, x, sens = _setup("resnet20")
    sens = copy.deepcopy(sens)
    first = [u for u in sens.units if u.group == "layer1.0.conv1"]
    for u in first:
        u.score = 1.0
    first[3].score = -1e9  # a large negative estimate: first out when signed, kept with "abs"
    signed = hap.plan(model, sens, Target(channels=0.1), implant=None, example_inputs=x)
    absolute = hap.plan(model, sens, Target(channels=0.1), implant=None, example_inputs=x, sign="abs")
    g_s = next(g for g in signed.groups if g.name == "layer1.0.conv1")
    g_a = next(g for g in absolute.groups if g.name == "layer1.0.conv1")
    assert 3 in g_s.removed and 3 in g_a.kept
    assert signed.settings["sign"] == "signed" and absolute.settings["sign"] == "abs"


def test_plan_leaves_model_untouched_and_records_provenance():
    model, x, sens = _setup("resnet20")
    before = copy.deepcopy(model.state_dict())
    p = hap.plan(model, sens, Target(params=0.2), example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert p.sensitivity_digest == sens.digest() and p.method == sens.method == "random"
    assert p.model_signature == hap.model_signature(model)
    assert p.pruned_signature == hap.model_signature(hap.prune(model, p))
    assert p.inputs == {"shape": [1, 1, 16, 16], "dtype": "float32"}


def test_heads_target_plans_attention_heads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, num_labels=3, max_position_embeddings=16, hidden_size=16,
                                  num_attention_heads=4, num_hidden_layers=2, intermediate_size=32)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    x = {"input_ids": torch.randint(3, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    sens = hap.sensitivity(model, lambda out, t: F.cross_entropy(out.logits, t), [(x, torch.zeros(2).long())],
                           units="heads", method="random", progress=False)
    p = hap.plan(model, sens, Target(heads=0.5), example_inputs=x, tol=0.2)
    assert p.heads_removed == pytest.approx(0.5) and all(g.kind == "head" and g.kept for g in p.groups)
    small = hap.prune(model, p)
    with torch.no_grad(), hap.mask_heads(model, {g.name: g.removed for g in p.groups}):
        ref = model(**x).logits
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, ref)
    assert PruningPlan.from_json(p.to_json()) == p


# ------------------------------------------------------------------------------------------------
# bad input


def test_target_validation():
    for bad in ({}, {"params": 0.5, "flops": 0.5}, {"params": 0.0}, {"params": 1.0}, {"flops": 1.5},
                {"channels": -0.1}, {"params": float("nan")}, {"params": True}, {"params": "0.5"}):
        with pytest.raises(ValueError, match="Target"):
            Target(**bad)
    t = Target(flops=0.25)
    assert (t.kind, t.value, str(t)) == ("flops", 0.25, "flops=0.25")
    assert Target.from_dict(t.to_dict()) == t and Target(heads=0.5).kind == "heads"
    with pytest.raises(ValueError, match="unknown target"):
        Target.from_dict({"ratio": 0.5})


def test_unreachable_target_says_why():
    model, x, sens = _setup("resnet20")
    with pytest.raises(PlanError, match="unreachable.*max_layer_ratio=0.5"):
        hap.plan(model, sens, Target(params=0.9), max_layer_ratio=0.5, example_inputs=x)
    everything = list(sens.by_group())
    with pytest.raises(PlanError, match="nothing can be pruned"):
        hap.plan(model, sens, Target(params=0.1), exclude=everything, example_inputs=x)


def test_coarse_units_say_so():
    model, x, sens = _setup("resnet20")
    with pytest.raises(PlanError, match="within"):
        hap.plan(model, sens, Target(params=0.5), round_to=16, example_inputs=x, tol=0.001)


def test_sensitivity_from_another_model():
    model, x, _ = _setup("resnet20")
    _, _, other = _setup("preresnet29")
    with pytest.raises(ValueError, match="another model"):
        hap.plan(model, other, Target(params=0.5), example_inputs=x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"implant": "dense"}, "implant"),
        ({"implant_fraction": 1.0}, "implant_fraction"),
        ({"allocation": "random"}, "allocation"),
        ({"round_to": 0}, "round_to"),
        ({"max_layer_ratio": 0.0}, "max_layer_ratio"),
        ({"sign": "positive"}, "sign"),
        ({"tol": 0.0}, "tol"),
        ({"exclude": ["no.such.layer"]}, "exclude"),
    ],
)
def test_bad_options(kwargs, match):
    model, x, sens = _setup("resnet20")
    with pytest.raises(ValueError, match=match):
        hap.plan(model, sens, Target(params=0.5), example_inputs=x, **kwargs)


def test_bad_target_type_and_flops_without_input_size():
    model, x, sens = _setup("resnet20")
    with pytest.raises(ValueError, match="hap.Target"):
        hap.plan(model, sens, 0.5)
    with pytest.raises(ValueError, match="head units"):
        hap.plan(model, sens, Target(heads=0.5), example_inputs=x)
    # the sensitivity records the input size it was computed on: the three-line use needs no inputs
    assert sens.settings["input_shape"] == [1, 16, 16]
    assert hap.plan(model, sens, Target(flops=0.3)).inputs["shape"] == [1, 1, 16, 16]
    unrecorded = copy.deepcopy(sens)
    del unrecorded.settings["input_shape"]
    with pytest.raises(ValueError, match="example_inputs"):
        hap.plan(model, unrecorded, Target(flops=0.5))
    p = hap.plan(model, unrecorded, Target(params=0.3))  # params: a guessed input size is fine, and recorded
    assert p.inputs["shape"] == [1, 1, 32, 32]


# ------------------------------------------------------------------------------------------------
# plan as data


def _a_plan() -> PruningPlan:
    model, x, sens = _setup("resnet20")
    return hap.plan(model, sens, Target(params=0.5), implant="lowrank", implant_fraction=0.3, example_inputs=x)


def test_json_round_trip_is_idempotent(tmp_path):
    p = _a_plan()
    text = p.to_json()
    assert PruningPlan.from_json(text).to_json() == text
    assert PruningPlan.from_json(text) == p
    assert json.loads(text)["target"] == {"params": 0.5}
    path = p.save(tmp_path / "plan.json")
    assert PruningPlan.load(path) == p and path.read_text() == text
    assert p.digest() == PruningPlan.from_json(text).digest()
    assert "layer1.0.conv1" in p.summary()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda t: t[: len(t) // 2],  # truncated
        lambda t: "",
        lambda t: "[]",
        lambda t: t.replace('"version": 1', '"version": 99'),
        lambda t: t.replace('"target": {\n  "params": 0.5\n }', '"target": {"params": 2}'),
        lambda t: t.replace('"kept": [', '"kept": [0, 0, '),  # channels listed twice
        lambda t: t.replace('"model_signature"', '"model_sig"'),
        lambda t: t.replace('"dtype": "float32"', '"dtype": "float99"'),
    ],
)
def test_corrupted_plan_json_is_a_clear_error(tmp_path, corrupt):
    text = _a_plan().to_json()
    bad = corrupt(text)
    assert bad != text
    path = tmp_path / "plan.json"
    path.write_text(bad)
    with pytest.raises(ValueError, match="not a valid plan") as err:
        PruningPlan.load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no plan file"):
        PruningPlan.load(tmp_path / "missing.json")


def test_group_plan_validation():
    GroupPlan("g", 3, [0], [1], [2], implant="pointwise").validate()
    for bad in (GroupPlan("g", 3, [], [1], [0, 2], implant="pointwise"), GroupPlan("g", 3, [0, 1], [], [1]),
                GroupPlan("g", 3, [0], [1], [2], implant="magic"), GroupPlan("g", 3, [0], [1], [2], implant="lowrank")):
        with pytest.raises(ValueError, match="group 'g'"):
            bad.validate()


def test_guessed_input_that_does_not_fit_asks_for_example_inputs():
    class Fixed(torch.nn.Module):  # a flatten into a Linear sized for 8x8 inputs only
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model = Fixed().eval()
    x = torch.randn(2, 1, 8, 8)
    sens = scores(model, x)
    del sens.settings["input_shape"]
    with pytest.raises(ValueError, match="guessed input of shape"):
        hap.plan(model, sens, Target(channels=0.5))
    assert hap.plan(model, sens, Target(channels=0.5), example_inputs=x, tol=0.2).inputs["shape"] == [1, 1, 8, 8]


def test_rank_by_score_per_param_prefers_expensive_units():
    """Two units with equal scores: per parameter, the one whose removal deletes more weights goes first."""
    model, x, sens = _setup("resnet20")
    sens = copy.deepcopy(sens)
    for u in sens.units:
        u.score = 1.0
    p = hap.plan(model, sens, Target(channels=0.05), implant=None, rank_by="score_per_param", allocation="global",
                  example_inputs=x)
    removed = {g.name for g in p.groups if g.removed}
    assert removed and removed <= {"layer3.0.shortcut.0", "layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"}
    assert p.settings["rank_by"] == "score_per_param"
    with pytest.raises(ValueError, match="rank_by"):
        hap.plan(model, sens, Target(channels=0.05), rank_by="flops", example_inputs=x)
    # under uniform allocation every group still loses the same share, whatever the key
    u = hap.plan(model, sens, Target(channels=0.5), implant=None, rank_by="layer_normalized", example_inputs=x)
    shares = [len(g.removed) / (len(g.kept) + len(g.removed)) for g in u.groups]
    assert max(shares) - min(shares) < 0.2


def test_rank_by_layer_normalized_spreads_pruning_like_michel():
    """A layer whose scores are all 1000x smaller is emptied first by the raw global ranking; after per-layer
    L2 normalisation it competes on equal terms, and the order inside every layer is unchanged."""
    model, x, sens = _setup("resnet20")
    sens = copy.deepcopy(sens)
    quiet = "layer3.2.conv1"
    for u in sens.units:
        u.score = abs(u.score) + 0.1
        if u.group == quiet:
            u.score *= 1e-3
    raw = hap.plan(model, sens, Target(channels=0.1), implant=None, allocation="global", example_inputs=x)
    norm = hap.plan(model, sens, Target(channels=0.1), implant=None, rank_by="layer_normalized", allocation="global",
                    example_inputs=x)
    share = {id(p): {g.name: len(g.removed) / (len(g.kept) + len(g.implanted) + len(g.removed)) for g in p.groups}
             for p in (raw, norm)}
    assert [n for n, v in share[id(raw)].items() if v > 0] == [quiet]  # all 10% taken from the quiet layer
    assert share[id(norm)][quiet] < share[id(raw)][quiet] / 2
    assert sum(v > 0 for v in share[id(norm)].values()) >= 4
    by_group = {}
    for u in sens.units:
        by_group.setdefault(u.group, []).append(u)
    for g in norm.groups:  # the least sensitive channels of each group are the ones removed
        ranked = sorted(by_group[g.name], key=lambda u: (u.score, u.index))
        assert sorted(g.removed) == sorted(u.index for u in ranked[: len(g.removed)])
    assert norm.settings["rank_by"] == "layer_normalized"


# -- latency targets and round_to="auto" (synthetic latency tables: tests/_latency_helpers.py) ------------------


def test_latency_target_met_by_its_prediction_and_unmeetable_target_says_so():
    model, x, sens = tiny()
    table = synthetic_for(model, x)
    plan = hap.plan(model, sens, hap.Target(latency=0.5), implant=None, example_inputs=x[:1], latency_table=table,
                    tol=0.03)
    lat = plan.settings["latency"]
    assert abs(plan.achieved_fraction() - 0.5) <= 0.03
    small = hap.prune(model, plan)
    assert predict_ms(table, model, small, x[:1]) == pytest.approx(lat["predicted_ms"])
    assert predict_ms(table, model, model, x[:1]) == pytest.approx(lat["dense_ms"])
    assert plan.to_json() and hap.PruningPlan.from_json(plan.to_json()).target == hap.Target(latency=0.5)
    implanted = hap.plan(model, sens, hap.Target(latency=0.4), implant="pointwise", implant_fraction=0.25,
                         example_inputs=x[:1], latency_table=table, tol=0.03)
    small = hap.prune(model, implanted)
    assert any(isinstance(m, ImplantedConv) for m in small.modules())
    assert predict_ms(table, model, small, x[:1]) == pytest.approx(implanted.settings["latency"]["predicted_ms"])
    assert abs(implanted.achieved_fraction() - 0.4) <= 0.03
    with pytest.raises(hap.PlanError) as e:
        hap.plan(model, sens, hap.Target(latency=0.9), implant=None, example_inputs=x[:1], latency_table=table,
                 max_layer_ratio=0.5)
    msg = str(e.value)
    assert "\n" not in msg and "latency=0.9 is unreachable" in msg and "removes only 0." in msg


def test_round_to_auto_records_the_chosen_multiple():
    model, x, sens = tiny()
    table = synthetic_for(model, x)
    for e in table.layers.values():  # a staircase at multiples of 4 in every layer
        e.sweep_widths = list(range(max(1, e.out_full // 2), e.out_full + 1))
        e.sweep_ms = [float(math.ceil(w / 4)) for w in e.sweep_widths]
    plan = hap.plan(model, sens, hap.Target(params=0.4), implant=None, example_inputs=x[:1], round_to="auto",
                    latency_table=table, tol=0.1)
    assert plan.settings["round_to"] == 4 and plan.settings["round_to_auto"]["chosen"] == 4
    assert all((len(g.kept) + len(g.implanted)) % 4 == 0 or not g.removed for g in plan.groups)
    with pytest.raises(ValueError, match="round_to must be an integer >= 1, got 'fast'"):
        hap.plan(model, sens, hap.Target(params=0.4), example_inputs=x[:1], round_to="fast")
