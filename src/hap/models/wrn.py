"""Wide ResNet (Zagoruyko & Komodakis 2016) with pre-activation basic blocks.

Stages have 16k/32k/64k channels for widen factor k. Two depth conventions are accepted, which can
never be confused because they differ modulo 6:

* ``6n + 4`` (WRN-16-4, WRN-28-10): Zagoruyko's count, which includes the stage projections.
* ``6n + 2``: the plain-ResNet count used by the HAP paper's "WRN-32" (n = 5 blocks per stage, widen 4).

The HAP reference code builds its WRN-32 as a post-activation ResNet-32 with 64/128/256 channels and a
64-channel stem; ``CifarResNet(32, widths=(64, 128, 256))`` gives that exact network. ``WideResNet(32, 4)``
has the same depth and stage widths with Zagoruyko's pre-activation blocks and a 16-channel stem.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hap.models._init import init_weights

__all__ = ["PreActBasicBlock", "WideResNet", "wrn_depth_to_blocks"]


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3(stride), BN-ReLU-(dropout)-conv3x3, plus shortcut.

    As in Zagoruyko's code, when the shape changes the 1x1 projection reads the *activated* input
    (BN-ReLU applied once, shared by both paths); otherwise the shortcut is the raw input.

    Args:
        in_planes: Channels entering the block.
        planes: Channels leaving the block.
        stride: Stride of the first convolution.
        dropout: Dropout probability between the two convolutions (0 disables it; 0.3 in the paper).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


def wrn_depth_to_blocks(depth: int) -> int:
    """Blocks per stage for a Wide ResNet of ``depth`` (6n + 4, or 6n + 2 as in HAP's WRN-32).

    Args:
        depth: Number of layers in either convention.

    Returns:
        ``n``, the number of blocks in each of the three stages.

    Raises:
        ValueError: If ``depth`` fits neither convention.
    """
    for offset in (4, 2):
        if depth - offset >= 6 and (depth - offset) % 6 == 0:
            return (depth - offset) // 6
    raise ValueError(f"WideResNet depth must be 6n+4 (16, 28, 40) or 6n+2 (32, as HAP), got {depth}")


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet for small images, classifier ``fc`` after global average pooling.

    Args:
        depth: 6n + 4 or 6n + 2, see the module docstring.
        widen_factor: k, the multiplier of the 16/32/64 stage widths.
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images.
        dropout: Dropout inside blocks (off by default: it would make Hessian estimates stochastic
            unless the model is in eval mode).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = wrn_depth_to_blocks(depth)
        self.depth = depth
        self.widen_factor = widen_factor
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages: list[nn.Sequential] = []
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBasicBlock(in_planes, planes, stride, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
