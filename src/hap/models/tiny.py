"""Tiny networks for unit tests of the Hessian, grouping and surgery code.

Each one exercises one structure the pruning code must get right (plain linear chain, conv+BN, a
residual add that ties channels across layers, a concat plus a depthwise conv whose channels map one to
one) and has at most a few hundred parameters, so a brute-force ``torch.func.hessian`` over all
weights is cheap enough to serve as the reference in tests.

Every model records ``input_shape`` (one example, without the batch dimension) and names its output
layer ``fc``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hap.models._init import init_weights

__all__ = ["TinyConcatDepthwise", "TinyConvBN", "TinyMLP", "TinyResidual", "example_input"]


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear over flattened inputs (~230 parameters by default).

    Args:
        in_features: Flattened input size (default 16 = one 1x4x4 image).
        hidden: Width of both hidden layers.
        num_classes: Outputs.
    """

    def __init__(self, in_features: int = 16, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.input_shape: tuple[int, ...] = (in_features,)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc(self.relu2(self.fc2(x)))


class TinyConvBN(nn.Module):
    """Two conv3x3-BN-ReLU layers, global pooling and a linear ``fc`` (~450 parameters by default).

    Args:
        in_channels: Input channels.
        num_classes: Outputs.
        width: Channels of the first conv; the second has ``2 * width``.
        image_size: Side of the square example input recorded in ``input_shape``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 4, image_size: int = 6) -> None:
        super().__init__()
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyResidual(nn.Module):
    """Stem conv-BN-ReLU, one basic residual block with an identity add, pooling, ``fc``.

    The add forces the stem conv, both BNs after it and the block's second conv into one dependency
    group: removing a channel of the stream removes it from all of them (~440 parameters by default).

    Args:
        in_channels: Input channels.
        num_classes: Outputs.
        width: Channels of the stem and the residual stream.
        image_size: Side of the square example input recorded in ``input_shape``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 4, image_size: int = 6) -> None:
        super().__init__()
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.block_conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block_bn1 = nn.BatchNorm2d(width)
        self.block_relu = nn.ReLU()
        self.block_conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block_bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        out = self.block_relu(self.block_bn1(self.block_conv1(x)))
        out = self.block_bn2(self.block_conv2(out))
        x = self.relu2(out + x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyConcatDepthwise(nn.Module):
    """Stem, two branches concatenated, a depthwise conv, a pointwise conv, pooling, ``fc``.

    The concat makes the consumer's input channels an index-mapped union of two producers; the
    depthwise conv (``groups == channels``) has to lose exactly the channels its input loses. Together
    they cover the index bookkeeping that plain chains never exercise (~520 parameters by default).

    Args:
        in_channels: Input channels.
        num_classes: Outputs.
        width: Channels of the stem and of each branch; the concat has ``2 * width``.
        image_size: Side of the square example input recorded in ``input_shape``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 4, image_size: int = 6) -> None:
        super().__init__()
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()
        self.branch_a = nn.Conv2d(width, width, 1, bias=False)
        self.branch_a_bn = nn.BatchNorm2d(width)
        self.branch_a_relu = nn.ReLU()
        self.branch_b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.branch_b_bn = nn.BatchNorm2d(width)
        self.branch_b_relu = nn.ReLU()
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(2 * width)
        self.depthwise_relu = nn.ReLU()
        self.pointwise = nn.Conv2d(2 * width, width, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(width)
        self.pointwise_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        a = self.branch_a_relu(self.branch_a_bn(self.branch_a(x)))
        b = self.branch_b_relu(self.branch_b_bn(self.branch_b(x)))
        x = torch.cat([a, b], dim=1)
        x = self.depthwise_relu(self.depthwise_bn(self.depthwise(x)))
        x = self.pointwise_relu(self.pointwise_bn(self.pointwise(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def example_input(model: nn.Module, batch_size: int = 2, seed: int = 0) -> Tensor:
    """A seeded standard-normal batch shaped for a tiny model's ``input_shape``.

    Args:
        model: A model from this module (anything with an ``input_shape`` tuple attribute).
        batch_size: Leading dimension.
        seed: Seed of the private generator, so tests do not disturb the global RNG.

    Returns:
        A float tensor of shape ``(batch_size, *model.input_shape)``.
    """
    shape = tuple(getattr(model, "input_shape"))  # noqa: B009 - attribute set by the tiny models only
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *shape), generator=generator)
