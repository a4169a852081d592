"""Pre-activation ResNet with bottleneck blocks (He et al. 2016b), depth 9n+2, e.g. PreResNet-29.

HAP (Yu et al. 2022) reports PreResNet-29 on CIFAR. The default layout here is the common CIFAR one
(network slimming, Liu et al. 2017): bottleneck widths 16/32/64 with expansion 4, so the residual stream
carries 64/128/256 channels. The HAP reference code instead uses expansion 1 with 64/128/256-wide
bottlenecks; ``PreResNet(29, widths=(64, 128, 256), expansion=1)`` reproduces that layout.

Pre-activation means every block starts with BN-ReLU and the residual stream itself is never
normalised until the final BN before pooling. For pruning this matters: each block's first BatchNorm
reads the residual stream, so Torch-Pruning's groups for a residual channel span every such BN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hap.models._init import init_weights

__all__ = ["PreActBottleneck", "PreResNet"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1 (x expansion), plus shortcut.

    The projection shortcut (a 1x1 conv, no BN, as in the pre-activation paper) reads the block's raw
    input, so the residual stream stays un-normalised between blocks.

    Args:
        in_planes: Residual-stream channels entering the block.
        planes: Bottleneck width; the block outputs ``planes * expansion`` channels.
        stride: Stride of the 3x3 convolution.
        expansion: Ratio of output to bottleneck width.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        out_planes = planes * expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + self.shortcut(x)


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet for small images.

    Args:
        depth: 9n + 2 (29, 47, 164, ...): stem conv + 3 stages x n blocks x 3 convs + classifier.
        num_classes: Outputs of the classifier ``fc``.
        in_channels: Channels of the input images.
        widths: Bottleneck widths of the three stages.
        expansion: Output-to-bottleneck width ratio of every block.
        stem_width: Channels of the stem conv; defaults to ``widths[0]`` (16 for the default layout,
            matching network slimming; the HAP reference uses 64).
    """

    def __init__(
        self,
        depth: int = 29,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        expansion: int = 4,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"PreResNet depth must be 9n+2 with n >= 1 (11, 29, 164, ...), got {depth}")
        if len(widths) != 3:
            raise ValueError(f"widths must give the 3 stage widths, got {tuple(widths)}")
        n = (depth - 2) // 9
        self.depth = depth
        in_planes = stem_width if stem_width is not None else widths[0]
        self.conv1 = nn.Conv2d(in_channels, in_planes, 3, padding=1, bias=False)
        stages: list[nn.Sequential] = []
        for i, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBottleneck(in_planes, planes, stride, expansion))
                in_planes = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # The stream is un-normalised after the last block: one BN-ReLU before pooling.
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
