"""Neural Implant modules: exactness at full rank, SVD optimality, alignment, cost, calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import hap
from hap.implant import (
    ImplantedConv,
    ScatterImplantedConv,
    implant_params,
    implant_unsupported_reason,
    implanted_conv,
    lowrank_implant,
    lowrank_rank,
    pointwise_implant,
    slice_conv,
)

from ._plan_helpers import ImplantNet, example, masked, randomize, scores  # noqa: F401

CONVS = [
    dict(cls=nn.Conv2d, k=3, stride=1, padding=1, dilation=1),
    dict(cls=nn.Conv2d, k=3, stride=2, padding=1, dilation=1),
    dict(cls=nn.Conv2d, k=5, stride=2, padding=4, dilation=2),
    dict(cls=nn.Conv2d, k=(3, 5), stride=1, padding=(1, 2), dilation=1),
    dict(cls=nn.Conv1d, k=3, stride=1, padding=1, dilation=1),
]


def _conv(spec, cin=4, cout=6, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = spec["cls"](cin, cout, spec["k"], stride=spec["stride"], padding=spec["padding"],
                       dilation=spec["dilation"], bias=bias).double()
    x = torch.randn(2, cin, *([9] * (2 if spec["cls"] is nn.Conv2d else 1)), dtype=torch.float64)
    return conv, x


@pytest.mark.parametrize("spec", CONVS)
def test_full_rank_lowrank_reproduces_the_conv(spec):
    conv, x = _conv(spec)
    ic = implanted_conv(conv, n_kept=2, kind="lowrank", rank=4)
    assert isinstance(ic, ImplantedConv) and (ic.n_kept, ic.n_implanted, ic.out_channels) == (2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ic(x), conv(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_truncated_lowrank_is_the_best_rank_r_kernel(rank):
    """Eckart-Young: the implant's effective kernel misses the original by exactly the tail singular values."""
    conv, _ = _conv(CONVS[0], cin=3, cout=5)
    imp = lowrank_implant(conv, rank)
    a, b = imp[0].weight, imp[1].weight  # [r, C, k, k], [n, r, 1, 1]
    eff = torch.einsum("nr,rckl->nckl", b[:, :, 0, 0], a)
    s = torch.linalg.svdvals(conv.weight.detach().reshape(5, -1))
    err = (eff - conv.weight).detach().norm()
    assert err.item() == pytest.approx(s[rank:].norm().item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(imp[1].bias, conv.bias)
    with pytest.raises(ValueError, match="rank must be in 1..5"):
        lowrank_implant(conv, 6)


@pytest.mark.parametrize("spec", CONVS)
def test_pointwise_implant_aligns_and_starts_at_zero(spec):
    conv, x = _conv(spec)
    pw = pointwise_implant(conv)
    assert pw.kernel_size == (1,) * len(conv.kernel_size) and pw.stride == conv.stride
    with torch.no_grad():
        out, ref = pw(x), conv(x)
    assert out.shape == ref.shape  # same positions as the k x k conv, for strides and dilations
    bias = conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(out, bias.expand_as(out))


def test_pointwise_of_a_centre_only_kernel_is_exact():
    """A 1x1 conv at the filter centre is the k x k conv whose kernel is zero off-centre: alignment check."""
    conv, x = _conv(CONVS[1])
    with torch.no_grad():
        centre = conv.weight[:, :, 1, 1].clone()
        conv.weight.zero_()
        conv.weight[:, :, 1, 1] = centre
        pw = pointwise_implant(conv)
        pw.weight.copy_(centre[:, :, None, None])
        torch.testing.assert_close(pw(x), conv(x))


def test_unsupported_layers_are_named():
    ok = nn.Conv2d(4, 4, 3, padding=1)
    assert implant_unsupported_reason(ok, "pointwise") is None
    assert "grouped" in implant_unsupported_reason(nn.Conv2d(4, 4, 3, padding=1, groups=2), "lowrank")
    assert "1x1" in implant_unsupported_reason(nn.Conv2d(4, 4, 1), "pointwise")
    assert "Linear" in implant_unsupported_reason(nn.Linear(4, 4), "pointwise")
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    assert "padding_mode" in implant_unsupported_reason(reflect, "lowrank")
    valid = nn.Conv2d(4, 4, 3)  # no padding: a 1x1 conv cannot align, a low-rank one can
    assert "align" in implant_unsupported_reason(valid, "pointwise")
    assert implant_unsupported_reason(valid, "lowrank") is None
    assert "align" in implant_unsupported_reason(nn.Conv2d(4, 4, 2, padding=1), "pointwise")
    assert "ConvTranspose2d" in implant_unsupported_reason(nn.ConvTranspose2d(4, 4, 3), "lowrank")
    with pytest.raises(ValueError, match="unknown implant"):
        implant_unsupported_reason(ok, "sparse")
    with pytest.raises(ValueError, match="pointwise implant"):
        pointwise_implant(valid)


@pytest.mark.parametrize("n, cin, cost", [(1, 16, 0.25), (4, 16, 0.25), (12, 32, 0.25), (12, 32, 0.5), (40, 64, 0.1)])
def test_lowrank_rank_is_the_largest_within_cost(n, cin, cost):
    r = lowrank_rank(n, cin, 9, cost)
    budget = cost * n * cin * 9
    if r == 0:
        assert implant_params("lowrank", n, cin, 9, 1) > budget
    else:
        assert implant_params("lowrank", n, cin, 9, r) <= budget
        assert r == min(n, cin * 9) or implant_params("lowrank", n, cin, 9, r + 1) > budget
    assert lowrank_rank(n, cin, 9, 100.0) == min(n, cin * 9)  # rank beyond full adds nothing


def test_implant_params_matches_the_modules():
    conv, _ = _conv(CONVS[0], cin=5, cout=7)
    src = slice_conv(conv, [1, 4, 6])
    pw = pointwise_implant(src)
    assert implant_params("pointwise", 3, 5, 9, bias=True) == sum(p.numel() for p in pw.parameters())
    lr = lowrank_implant(src, 2)
    assert implant_params("lowrank", 3, 5, 9, rank=2, bias=True) == sum(p.numel() for p in lr.parameters())


def test_scatter_layout_matches_concat_up_to_the_permutation():
    conv, x = _conv(CONVS[0])
    order = [4, 1, 5, 0, 2, 3]  # kept: channels 4, 1; implanted: 5, 0, 2, 3
    fast = implanted_conv(slice_conv(conv, order), 2, "lowrank", rank=4)
    slow = implanted_conv(slice_conv(conv, order), 2, "lowrank", rank=4, kept_pos=order[:2], implanted_pos=order[2:])
    assert isinstance(slow, ScatterImplantedConv)
    with torch.no_grad():
        torch.testing.assert_close(slow(x), conv(x))
        torch.testing.assert_close(fast(x), conv(x)[:, order])


def test_implanted_conv_validates_split():
    conv, _ = _conv(CONVS[0])
    for n_kept in (0, 6):
        with pytest.raises(ValueError, match="n_kept"):
            implanted_conv(conv, n_kept, "pointwise")
    with pytest.raises(ValueError, match="rank"):
        implanted_conv(conv, 2, "lowrank")
    with pytest.raises(ValueError, match="unknown implant"):
        implanted_conv(conv, 2, "dense")


def test_calibrate_recovers_one_by_one_representable_channels():
    """If the implanted filters are centre-only, least squares finds them: pruned == masked-removed-only.

    The fit targets the outputs of the model it is given; against the masked model (removed channels
    zeroed upstream too) every implanted channel is exactly a 1x1 conv of the pruned inputs.
    """
    model = randomize(ImplantNet().double())
    x = example(model, n=8)
    sens = scores(model, x)
    p = hap.plan(model, sens, hap.Target(channels=0.5), implant_fraction=0.4, example_inputs=x[:1], tol=0.3)
    implanted = {g.name: g.implanted for g in p.groups if g.implanted}
    assert implanted
    with torch.no_grad():
        for name, rows in implanted.items():
            w = dict(model.named_modules())[name].weight
            centre = w[rows, :, 1, 1].clone()
            w[rows] = 0.0
            w[rows, :, 1, 1] = centre
    small = hap.prune(model, p)
    target = masked(model, sens, p.groups, zero_implanted=False)
    with torch.no_grad():
        before = (small(x) - target(x)).abs().max()
    res = hap.calibrate(small, target, p, [(x, None)], ridge=1e-12)
    assert set(res) == set(implanted) and max(res.values()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(small(x), target(x), rtol=1e-5, atol=1e-6)
    assert before > 1e-3  # zero init was not already exact


def test_calibrate_beats_zero_init_on_real_filters():
    model = randomize(ImplantNet().double())
    x = example(model, n=16)
    sens = scores(model, x)
    p = hap.plan(model, sens, hap.Target(channels=0.5), implant_fraction=0.4, example_inputs=x[:1], tol=0.3)
    small = hap.prune(model, p)
    ref = masked(model, sens, p.groups, zero_implanted=False)  # implanted channels as the original filters
    with torch.no_grad():
        err0 = (small(x) - ref(x)).norm()
        hap.calibrate(small, model, p, [x])
        err1 = (small(x) - ref(x)).norm()
    assert err1 < err0
