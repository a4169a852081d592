"""Every zoo model: shapes for 1- and 3-channel inputs, a training step, and prunability by Torch-Pruning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from hap import models
from hap.models import VGG, CifarResNet, PreResNet, WideResNet
from hap.models.resnet import resnet_depth_to_blocks
from hap.models.wrn import wrn_depth_to_blocks

ALL = models.list_models()
# Spatial size for the pruning tests: big enough to survive every model's downsampling, small enough
# that tracing a 110-layer net stays well under a second.
PRUNE_SIZE = 8


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    expected = {"resnet20", "resnet32", "resnet56", "resnet110", "preresnet29", "wrn16_4", "wrn32_4"}
    expected |= {"vgg16", "vgg16_bn"}
    assert set(ALL) == expected
    assert ALL == sorted(ALL)
    assert models.available() == ALL


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet20") as info:
        models.create("resnet21")
    assert "vgg16_bn" in str(info.value)


def test_create_is_case_and_dash_insensitive() -> None:
    assert isinstance(models.create("VGG16-BN"), VGG)


def test_register_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("resnet20")(lambda **kw: nn.Identity())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("in_channels", "size", "num_classes"), [(1, 28, 7), (3, 32, 10)])
def test_forward_shape(name: str, in_channels: int, size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = models.create(name, num_classes=num_classes, in_channels=in_channels)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_sgd_step_changes_weights(name: str) -> None:
    torch.manual_seed(0)
    model = models.create(name, num_classes=5, in_channels=1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(torch.randn(2, 1, 16, 16)), torch.tensor([0, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(changed)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.26e6, 0.28e6),  # paper: 0.27M
        ("resnet32", 0.46e6, 0.48e6),  # paper: 0.46M
        ("resnet56", 0.84e6, 0.87e6),  # paper: 0.85M
        ("resnet110", 1.70e6, 1.76e6),  # paper: 1.7M
        ("wrn16_4", 2.70e6, 2.80e6),  # Zagoruyko: 2.7M
        ("vgg16", 14.6e6, 14.8e6),
    ],
)
def test_parameter_counts(name: str, low: float, high: float) -> None:
    assert low <= n_params(models.create(name, num_classes=10, in_channels=3)) <= high


@pytest.mark.parametrize("name", ALL)
def test_classifier_is_discoverable(name: str) -> None:
    model = models.create(name, num_classes=6)
    fc = models.get_classifier(model)
    assert isinstance(fc, nn.Linear) and fc.out_features == 6
    assert fc is model.fc
    assert any(m is fc for m in model.modules())
    assert isinstance(model.get_submodule("avgpool"), nn.AdaptiveAvgPool2d)


def test_vgg_fc_aliases_classifier_without_duplicating_it() -> None:
    model = models.create("vgg16_bn")
    assert isinstance(model, VGG)
    assert model.fc is model.classifier
    assert not any(name.startswith("fc") for name, _ in model.named_parameters())


def test_get_classifier_falls_back_to_last_linear() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert models.get_classifier(net) is net[2]
    with pytest.raises(ValueError, match="no 'fc'"):
        models.get_classifier(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("name", ALL)
def test_torch_pruning_groups_and_prunes(name: str) -> None:
    torch.manual_seed(0)
    model = models.create(name, num_classes=4, in_channels=1).eval()
    x = torch.randn(1, 1, PRUNE_SIZE, PRUNE_SIZE)
    fc = models.get_classifier(model)

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = list(graph.get_all_groups(ignored_layers=[fc]))
    assert groups
    # No group may touch the classifier's outputs (the class count must survive pruning).
    for group in groups:
        for dep, _ in group:
            assert not (dep.target.module is fc and dep.handler == tp.prune_linear_out_channels)

    before = n_params(model)
    pruner = tp.pruner.BasePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[fc],
    )
    pruner.step()
    out = model(x)
    assert out.shape == (1, 4)
    assert torch.isfinite(out).all()
    assert fc.out_features == 4
    assert n_params(model) < 0.4 * before  # half the channels -> roughly a quarter of the weights


@pytest.mark.parametrize(("depth", "n"), [(20, 3), (32, 5), (56, 9), (110, 18)])
def test_resnet_depth(depth: int, n: int) -> None:
    assert resnet_depth_to_blocks(depth) == n
    model = CifarResNet(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # weighted layers on the main path: 3x3 convs + fc


def test_resnet_uses_option_b_projection_only_where_shape_changes() -> None:
    model = CifarResNet(20)
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]


def test_bad_depths_raise() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="9n\\+2"):
        PreResNet(30)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(30, 4)


def test_preresnet29_layout() -> None:
    model = PreResNet(29)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [model.get_submodule(f"layer{i}.0.shortcut") for i in (1, 2, 3)]
    assert all(isinstance(s, nn.Conv2d) for s in shortcuts)
    assert len(convs) - len(shortcuts) + 1 == 29
    assert model.fc.in_features == 256  # 64 x expansion 4
    # The HAP reference layout: expansion 1, 64/128/256 bottlenecks, 64-channel stem.
    ref = PreResNet(29, widths=(64, 128, 256), expansion=1, stem_width=64)
    assert ref.fc.in_features == 256 and ref.conv1.out_channels == 64


@pytest.mark.parametrize(("depth", "n"), [(16, 2), (28, 4), (32, 5), (40, 6)])
def test_wrn_depth_conventions(depth: int, n: int) -> None:
    assert wrn_depth_to_blocks(depth) == n


def test_wrn32_4_widths() -> None:
    model = models.create("wrn32_4")
    assert isinstance(model, WideResNet)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.fc.in_features == 256


def test_vgg_runs_on_small_inputs() -> None:
    # ceil_mode pooling: 28 -> 14 -> 7 -> 4 -> 2 -> 1 rather than a zero-size map.
    model = models.create("vgg16", in_channels=1).eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert model(torch.randn(1, 1, 5, 5)).shape == (1, 10)


def test_kaiming_init_and_identity_bn() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20)
    conv = model.get_submodule("layer3.0.conv2")  # fan_out = 64 * 9
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
