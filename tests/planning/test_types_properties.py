"""Properties of plans as data (hypothesis): every :class:`hap.Target` value is accepted exactly when it is a
fraction strictly between 0 and 1, a :class:`hap.PruningPlan` survives its JSON round trip unchanged, and a
truncated, mutated or tampered ``plan.json`` / ``sensitivity.json`` is refused with a one-line ValueError
naming the file (never another exception, never a plan that breaks its own invariants)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hap
from hap.planning import GroupPlan, PruningPlan, Target
from hap.planning.types import TARGET_KINDS

from ..conftest import make_tiny

FAST = settings(max_examples=30, deadline=None, database=None,  # small, and no example files in the tree
                suppress_health_check=[HealthCheck.function_scoped_fixture])

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans(),
                    st.just(0.0), st.just(1.0), st.floats(0, 1, exclude_min=True, exclude_max=True))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _is_fraction(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1


@FAST
@given(kind=st.sampled_from(TARGET_KINDS), value=numbers)
def test_a_target_is_exactly_a_fraction_strictly_between_0_and_1(kind, value):
    if _is_fraction(value):
        t = Target(**{kind: value})
        assert (t.kind, t.value) == (kind, float(value))
        assert Target.from_dict(t.to_dict()) == t
        assert Target.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    else:
        with pytest.raises(ValueError, match="strictly between 0 and 1") as e:
            Target(**{kind: value})
        assert "\n" not in str(e.value)


@FAST
@given(kinds=st.lists(st.sampled_from(TARGET_KINDS), unique=True, max_size=4).filter(lambda k: len(k) != 1),
       value=st.floats(0.1, 0.9))
def test_a_target_names_exactly_one_kind(kinds, value):
    with pytest.raises(ValueError, match="exactly one of"):
        Target(**{k: value for k in kinds})


@st.composite
def group_plans(draw, name: str) -> GroupPlan:
    size = draw(st.integers(1, 8))
    idx = draw(st.permutations(range(size)))
    n_kept = draw(st.integers(1, size))
    n_impl = draw(st.integers(0, size - n_kept))
    implant = draw(st.sampled_from(["pointwise", "lowrank"])) if n_impl else None
    return GroupPlan(name=name, size=size, kept=sorted(idx[:n_kept]), implanted=sorted(idx[n_kept:n_kept + n_impl]),
                     removed=sorted(idx[n_kept + n_impl:]), implant=implant,
                     rank=draw(st.integers(1, 4)) if implant == "lowrank" else None,
                     note=draw(st.text(max_size=10)), kind=draw(st.sampled_from(["channel", "head", "neuron"])))


@st.composite
def plans(draw) -> PruningPlan:
    names = draw(st.lists(st.from_regex(r"[a-z]{1,4}(\.[0-9]{1,2}){0,2}", fullmatch=True), min_size=1, max_size=5,
                          unique=True))
    kind = draw(st.sampled_from(TARGET_KINDS))
    hexes = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
    base = {"params": draw(st.integers(1, 10**7)), "macs": draw(st.integers(1, 10**9))}
    return PruningPlan(
        target=Target(**{kind: draw(st.floats(0.01, 0.99))}),
        groups=[draw(group_plans(n)) for n in names],
        model_signature=draw(hexes), sensitivity_digest=draw(hexes), method=draw(st.sampled_from(["hap", "l1", "obs"])),
        allocation=draw(st.sampled_from(["uniform", "global"])), implant=draw(st.sampled_from([None, "pointwise"])),
        implant_fraction=draw(st.floats(0, 0.9)),
        inputs=draw(st.sampled_from([{"shape": [1, 3, 8, 8], "dtype": "float32"},
                                     {"kwargs": {"input_ids": {"shape": [1, 16], "dtype": "int64"}}}])),
        base=base, achieved={k: draw(st.integers(0, v)) for k, v in base.items()},
        pruned_signature=draw(st.none() | hexes),
        settings=draw(st.dictionaries(st.sampled_from(["sign", "rank_by", "tol"]), st.text(max_size=5), max_size=2)),
    )


@FAST
@given(plan=plans())
def test_a_plan_survives_its_json_round_trip(plan, tmp_path):
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    path = plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(path) == plan


def _refused(load, path: Path) -> object:
    """``load(path)``: a valid object, or a one-line ValueError naming the file; any other outcome fails."""
    try:
        return load(path)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None


def _check_plan(p: PruningPlan) -> None:
    for g in p.groups:
        g.validate()  # a plan that loads keeps its invariants
    assert _is_fraction(p.target.value)


@FAST
@given(plan=plans(), data=st.data())
def test_a_truncated_or_mutated_plan_file_is_refused_in_one_line(plan, data, tmp_path):
    path = tmp_path / "plan.json"
    text = plan.to_json()
    cut = data.draw(st.integers(0, len(text) - 1))
    path.write_text(text[:cut])
    assert _refused(PruningPlan.load, path) is None  # a truncated object is never a plan
    d = plan.to_dict()
    where = data.draw(st.sampled_from(["top", "group", "target", "inputs"]))
    obj = {"top": d, "group": d["groups"][0], "target": d["target"], "inputs": d["inputs"]}[where]
    key = data.draw(st.sampled_from(sorted(obj)))
    if data.draw(st.booleans()):
        del obj[key]
    else:
        obj[key] = data.draw(json_values)
    path.write_text(json.dumps(d))
    got = _refused(PruningPlan.load, path)
    if got is not None:
        _check_plan(got)
    raw = bytearray(text.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))  # one byte tampered with (not always UTF-8 any more)
    path.write_bytes(bytes(raw))
    got = _refused(PruningPlan.load, path)
    if got is not None:
        _check_plan(got)


@pytest.fixture(scope="module")
def sens_text() -> str:
    model, x, y = make_tiny("convbn")
    return hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l1", progress=False).to_json(indent=1)


@FAST
@given(data=st.data())
def test_a_truncated_or_mutated_sensitivity_file_is_refused_in_one_line(sens_text, data, tmp_path):
    path = tmp_path / "sensitivity.json"
    cut = data.draw(st.integers(0, len(sens_text) - 1))
    path.write_text(sens_text[:cut])
    assert _refused(hap.Sensitivity.load, path) is None
    d = json.loads(sens_text)
    obj = data.draw(st.sampled_from([d, d["units"][0]]))
    key = data.draw(st.sampled_from(sorted(obj)))
    if data.draw(st.booleans()):
        del obj[key]
    else:
        obj[key] = data.draw(json_values | st.sampled_from([float("nan"), float("inf")]))
    path.write_text(json.dumps(d))
    got = _refused(hap.Sensitivity.load, path)
    if got is not None:  # what loads is usable: finite scores, one per unit
        assert all(math.isfinite(u.score) for u in got.units) and len(got.scores) == len(got.units)
    raw = bytearray(sens_text.encode())
    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    got = _refused(hap.Sensitivity.load, path)
    if got is not None:
        assert all(math.isfinite(u.score) for u in got.units)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "-inf"])
def test_a_non_finite_score_in_a_sensitivity_file_is_refused(sens_text, tmp_path, value):
    d = json.loads(sens_text)
    d["units"][1]["score"] = value
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="non-finite score") as e:
        hap.Sensitivity.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
