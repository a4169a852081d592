"""hap.fold_batchnorm: outputs unchanged (dense, pruned, implanted zoo models), fewer BatchNorms, the original
untouched, and BatchNorms that cannot be folded (pre-activation, after an add) left in place with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
import hap.models

from ._plan_helpers import ImplantNet, randomize


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check(model: nn.Module, x: torch.Tensor) -> hap.fold.FoldReport:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.eval()(x)
        folded, rep = hap.fold_batchnorm(model, report=True)
        out = folded(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert _bns(folded) == _bns(model) - len(rep.folded)
    assert type(folded) is type(model)
    return rep


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_zoo_dense_and_pruned_fold_exactly(name):
    torch.manual_seed(0)
    model = randomize(hap.models.create(name, num_classes=10, in_channels=3))
    x = torch.randn(3, 3, 16, 16)
    rep = _check(model, x)
    assert _bns(model) - len(rep.folded) == 0  # post-activation ResNet: every BN follows a conv
    sens = hap.sensitivity(model, F.cross_entropy, [(x, torch.zeros(3, dtype=torch.long))], method="l1",
                           progress=False)
    plan = hap.plan(model, sens, hap.Target(params=0.5), implant="pointwise", implant_fraction=0.2,
                    example_inputs=x[:1])
    small = hap.prune(model, plan)
    assert any(isinstance(m, hap.ImplantedConv) for m in small.modules())
    rep = _check(small, x)
    assert not rep.skipped and rep.folded


def test_preactivation_folds_only_bns_that_follow_a_conv():
    torch.manual_seed(0)
    model = randomize(hap.models.create("preresnet29", num_classes=10, in_channels=3))
    rep = _check(model, torch.randn(2, 3, 16, 16))
    skipped = dict(rep.skipped)
    assert rep.folded and skipped
    assert "layer1.0.bn1" in skipped and "bn" in skipped  # after the block input / after the last add
    assert all(bn.rpartition(".")[2] != "bn1" or not bn.startswith("layer") for _, bn in rep.folded)


def test_implant_net_linear_bn_and_untraceable_model():
    model = randomize(ImplantNet())
    rep = _check(model, torch.randn(2, 1, 6, 6))
    assert {b for _, b in rep.folded} == {"stem_bn", "a_bn", "c_bn"}

    class LinBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    m = randomize(LinBN())
    _, rep = hap.fold_batchnorm(m, report=True)
    assert not rep.folded and "example_inputs" in rep.skipped[0][1]
    x = torch.randn(3, 4)
    folded, rep = hap.fold_batchnorm(m, x, report=True)
    assert rep.folded == [("fc", "bn")] and torch.allclose(folded(x), m(x), atol=1e-5)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.c(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="cannot fold BatchNorm: torch.fx cannot trace Branchy"):
        hap.fold_batchnorm(Branchy())
    no_bn = nn.Sequential(nn.Conv2d(1, 2, 1))  # nothing to fold: a copy, without tracing
    copy_, rep = hap.fold_batchnorm(no_bn, report=True)
    assert copy_ is not no_bn and rep.folded == rep.skipped == [] and torch.equal(copy_[0].weight, no_bn[0].weight)
