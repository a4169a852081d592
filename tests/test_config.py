"""Config dataclasses: JSON round-trip, strict keys, versions; the registry idiom."""

from __future__ import annotations

import json

import pytest

from hap.config import Config, ConfigError, PlanConfig, Registry, SensitivityConfig


@pytest.mark.parametrize("cls", [SensitivityConfig, PlanConfig])
def test_round_trip_through_json(cls):
    cfg = cls()
    changed = cfg.replace(seed=3) if cls is SensitivityConfig else cfg.replace(round_to=8, exclude=("a", "b"))
    again = cls.from_dict(json.loads(json.dumps(changed.to_dict())))
    assert again == changed and again != cfg


def test_strict_keys_and_versions():
    with pytest.raises(ConfigError, match=r"no option\(s\) \['tool'\]"):
        PlanConfig.from_dict({"tool": 0.1})
    with pytest.raises(ConfigError, match="version 99"):
        PlanConfig.from_dict({"version": 99})
    with pytest.raises(ConfigError, match="no option"):
        SensitivityConfig().replace(curvatur="fisher")
    assert PlanConfig.from_dict({}) == PlanConfig()  # a hand-written file may omit the version


def test_defaults_are_the_dataclass_fields():
    assert PlanConfig.defaults()["max_layer_ratio"] == PlanConfig().max_layer_ratio
    assert set(SensitivityConfig.defaults()) == {f for f in SensitivityConfig().to_dict() if f != "version"}


def test_nested_configs_round_trip():
    from dataclasses import dataclass, field

    @dataclass
    class Outer(Config):
        plan: PlanConfig = field(default_factory=PlanConfig)
        name: str = "x"

    o = Outer(plan=PlanConfig(allocation="global"), name="y")
    assert Outer.from_dict(json.loads(json.dumps(o.to_dict()))) == o


def test_registry():
    r: Registry[int] = Registry("widget")
    r.register("a", 1, aliases=("alpha",))
    assert r.get("alpha") == 1 and r.canonical("alpha") == "a" and "alpha" in r and r.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha", 2)
    with pytest.raises(ValueError, match="unknown widget 'b'; choose one of a"):
        r.get("b")
    r.unregister("a")
    assert "alpha" not in r
