"""Every registered criterion, through the one entry point, on every unit kind it claims to support."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

import hap

from ..conftest import make_tiny

CHANNEL_CRITERIA = hap.criteria.names("channel")
HEAD_CRITERIA = hap.criteria.names("head")


def test_registry_lists_the_built_in_criteria():
    assert {"hap", "hap-fisher", "hap-hessian", "l1", "l2", "taylor", "obd", "michel", "random"} <= set(
        hap.criteria.names())
    assert "michel" in HEAD_CRITERIA and "michel" not in CHANNEL_CRITERIA
    assert hap.criteria.get("magnitude").name == "l1"  # alias
    for name in hap.criteria.names():
        crit = hap.criteria.get(name)
        assert crit.description, f"criterion {name!r} has no description for --help"
        assert set(crit.options) <= set(hap.SensitivityConfig.defaults())


@pytest.mark.parametrize("method", CHANNEL_CRITERIA)
def test_every_channel_criterion_scores_every_unit(method):
    model, x, y = make_tiny("convbn")
    batches = [(x[i::2], y[i::2]) for i in range(2)]
    sens = hap.sensitivity(model, F.cross_entropy, batches, method=method, max_samples=8, min_samples=4,
                           progress=False)
    assert sens.method == method and len(sens.units) == len(hap.flatten_units(hap.channel_groups(model, x)))
    assert np.all(np.isfinite(sens.scores))
    if hap.criteria.get(method).needs_data:
        assert sens.batches > 0
    else:
        assert sens.batches == 0
    again = hap.Sensitivity.from_json(sens.to_json())
    np.testing.assert_array_equal(again.scores, sens.scores)


@pytest.mark.parametrize("method", HEAD_CRITERIA)
def test_every_head_criterion_scores_every_head(method):
    pytest.importorskip("transformers")
    import torch

    from ..text.conftest import make_bert

    model = make_bert()
    ids = torch.randint(5, 20, (4, 6))
    batches = [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.tensor([0, 1, 0, 1]))]

    def loss_fn(out, y):
        return F.cross_entropy(out.logits, y)

    sens = hap.sensitivity(model, loss_fn, batches, units="heads", method=method, max_samples=8, min_samples=4,
                           progress=False)
    assert len(sens.units) == 8 and np.all(np.isfinite(sens.scores))


def test_unknown_criterion_names_the_choices():
    model, x, y = make_tiny("mlp")
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of hap"):
        hap.sensitivity(model, F.cross_entropy, [(x, y)], method="nope")


def test_unknown_option_is_an_error():
    model, x, y = make_tiny("mlp")
    with pytest.raises(ValueError, match="no option"):
        hap.sensitivity(model, F.cross_entropy, [(x, y)], max_sample=3)
