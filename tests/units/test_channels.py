"""Channel units from the dependency graph: every slice a unit names is exactly what reads or writes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hap
from hap.units import ROLE_IN, UnsupportedLayerError

from ..conftest import make_tiny


def _zero(model: nn.Module, slices) -> nn.Module:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for s in slices:
            named[s.param].index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    return model


def test_units_cover_every_channel(tiny):
    _, model, x, _ = tiny
    groups = hap.channel_groups(model, x)
    named = dict(model.named_modules())
    for g in groups:
        widths = {p: named[p].out_channels if isinstance(named[p], nn.Conv2d) else named[p].out_features
                  for p in g.producers}
        narrower = [w for w in widths.values() if w != g.size]
        # every producer spans the group, except concatenated branches, which tile it
        assert not narrower or sum(narrower) == g.size, f"{g.name}: {g.size} units, producers {widths}"
        assert [u.index for u in g.units] == list(range(g.size))


def test_output_layer_is_not_a_unit(tiny):
    _, model, x, _ = tiny
    assert all(s.param != "fc.bias" for u in hap.flatten_units(hap.channel_groups(model, x)) for s in u.slices)


def test_consumer_slices_are_the_only_readers(tiny):
    """Zeroing only the consumer-side slices of a unit must cut the channel off completely: the output
    then equals the one with every slice of the unit zeroed. A missed reader breaks the equality."""
    _, model, x, _ = tiny
    model.eval()
    for unit in hap.flatten_units(hap.channel_groups(model, x))[::2]:
        readers = [s for s in unit.slices if s.role == ROLE_IN]
        a = _zero(make_tiny(_name_of(model))[0].eval(), readers)(x)
        b = _zero(make_tiny(_name_of(model))[0].eval(), unit.slices)(x)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _name_of(model: nn.Module) -> str:
    from ..conftest import TINY

    return next(k for k, v in TINY.items() if isinstance(model, v))


def test_residual_group_spans_both_producers():
    model, x, _ = make_tiny("residual")
    groups = {g.name: g for g in hap.channel_groups(model, x)}
    coupled = [g for g in groups.values() if {"stem", "conv"} <= set(g.producers)]
    assert coupled and {"conv", "head"} <= set(coupled[0].consumers)


def test_flatten_maps_each_channel_to_its_features():
    model, x, _ = make_tiny("concat_dw")
    g = next(g for g in hap.channel_groups(model, x) if "pw" in g.producers)
    fc = [s for s in g.units[1].slices if s.param == "fc.weight"]
    assert fc and fc[0].indices == (4, 5, 6, 7)  # channel 1 of 3, pooled to 2x2, flattened


def test_exclude_and_errors():
    model, x, _ = make_tiny("convbn")
    groups = hap.channel_groups(model, x, exclude=["conv1"])
    assert all("conv1" not in g.producers for g in groups)
    with pytest.raises(ValueError, match="does not have"):
        hap.channel_groups(model, x, exclude=["nope"])
    with pytest.raises(ValueError, match="no prunable"):
        hap.channel_groups(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4))


def test_grouped_conv_is_refused_with_its_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 4, 6, 6)
    model(x)
    with pytest.raises(UnsupportedLayerError, match="'0'.*grouped"):
        hap.channel_groups(model, x)


def test_json_round_trip_of_units(tiny):
    _, model, x, _ = tiny
    for u in hap.flatten_units(hap.channel_groups(model, x)):
        assert hap.Unit.from_dict(u.to_dict()) == u
