"""CIFAR ResNet (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, depth 6n+2.

The one deliberate departure from the paper's CIFAR setting is the shortcut: when a block changes the
shape we use option B (1x1 convolution + BatchNorm projection) instead of option A (stride-2
subsampling padded with zero channels). Option A is an untraced tensor op with no weights, so a pruning
dependency graph (Torch-Pruning) cannot tie the zero-padded channels of the residual stream to any layer;
with a real projection, removing a residual channel is an ordinary, traceable group. The projection adds
~2.8k parameters to ResNet-20 (0.272M instead of 0.270M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hap.models._init import init_weights

__all__ = ["BasicBlock", "CifarResNet", "resnet_depth_to_blocks"]


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU.

    Args:
        in_planes: Channels entering the block.
        planes: Channels leaving the block.
        stride: Stride of the first convolution (2 halves the resolution at a stage boundary).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # Option-B projection only where the identity cannot be used; identity elsewhere (as the paper).
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def resnet_depth_to_blocks(depth: int) -> int:
    """Blocks per stage of a CIFAR ResNet of ``depth`` layers (depth = 6n + 2).

    Args:
        depth: Number of weighted layers (1 stem conv + 6n block convs + 1 classifier).

    Returns:
        ``n``, the number of basic blocks in each of the three stages.

    Raises:
        ValueError: If ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv, three stages of basic blocks, global pooling, linear ``fc``.

    Global average pooling (instead of the paper's fixed 8x8 pool) lets the same network run on 28x28
    Fashion-MNIST and 32x32 CIFAR alike.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        widths: Channels of the three stages. ``(64, 128, 256)`` with depth 32 is the wide "ResNet-32"
            that the HAP reference code trains as its WRN-32.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must give the 3 stage widths, got {tuple(widths)}")
        n = resnet_depth_to_blocks(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages: list[nn.Sequential] = []
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
