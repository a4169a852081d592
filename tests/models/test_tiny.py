"""The tiny test networks: small enough for a brute-force Hessian, structured enough for the groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.func import functional_call, hessian

from hap.models import tiny

TINY = [tiny.TinyMLP, tiny.TinyConvBN, tiny.TinyResidual, tiny.TinyConcatDepthwise]


@pytest.mark.parametrize("cls", TINY)
def test_tiny_models_are_tiny_and_run(cls: type[nn.Module]) -> None:
    model = cls()
    assert sum(p.numel() for p in model.parameters()) < 2000
    x = tiny.example_input(model, batch_size=3)
    assert model(x).shape == (3, 3)
    assert isinstance(model.fc, nn.Linear)


def test_example_input_is_seeded() -> None:
    model = tiny.TinyConvBN()
    assert torch.equal(tiny.example_input(model, seed=1), tiny.example_input(model, seed=1))
    assert not torch.equal(tiny.example_input(model, seed=1), tiny.example_input(model, seed=2))


@pytest.mark.parametrize("cls", TINY)
def test_full_hessian_is_cheap_and_symmetric(cls: type[nn.Module]) -> None:
    model = cls().eval()
    x = tiny.example_input(model, batch_size=4)
    y = torch.tensor([0, 1, 2, 0])
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}
    flat = torch.cat([v.flatten() for v in params.values()])

    def loss(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes.values()])
        named = {k: c.view(s) for (k, s), c in zip(shapes.items(), chunks, strict=True)}
        return F.cross_entropy(functional_call(model, named, (x,)), y)

    h = hessian(loss)(flat)
    assert h.shape == (flat.numel(), flat.numel())
    assert torch.allclose(h, h.T, atol=1e-5)
    assert h.abs().sum() > 0


def _group_sizes(model: nn.Module) -> list[int]:
    x = tiny.example_input(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    return sorted(len(g) for g in graph.get_all_groups(ignored_layers=[model.fc]))


def test_residual_add_ties_channels_into_one_group() -> None:
    model = tiny.TinyResidual()
    x = tiny.example_input(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0])
    modules = {dep.target.module for dep, _ in group}
    # The stem and the block's last conv write the same stream; both BNs and both readers follow.
    assert {model.conv1, model.bn1, model.block_conv2, model.block_bn2, model.block_conv1, model.fc} <= modules


def test_concat_and_depthwise_map_indices() -> None:
    model = tiny.TinyConcatDepthwise()
    x = tiny.example_input(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = graph.get_pruning_group(model.branch_b, tp.prune_conv_out_channels, idxs=[1])
    by_module = {dep.target.module: idxs for dep, idxs in group}
    assert model.depthwise in by_module and model.pointwise in by_module
    # branch_b's channel 1 is channel width + 1 of the concat, hence of the depthwise conv.
    assert list(by_module[model.depthwise]) == [model.branch_a.out_channels + 1]


@pytest.mark.parametrize("cls", TINY)
def test_tiny_models_prune(cls: type[nn.Module]) -> None:
    model = cls().eval()
    x = tiny.example_input(model)
    assert _group_sizes(model)
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    assert model(x).shape == (2, 3)
