"""VGG-16 for small images (Simonyan & Zisserman 2015, CIFAR variant), with or without BatchNorm.

The CIFAR variant drops ImageNet's three 4096-wide fully connected layers for a single linear
classifier: on 32x32 inputs the feature map is 1x1 after five poolings, so the big head would only add
parameters that dominate any pruning ratio. Poolings use ``ceil_mode=True`` so 28x28 inputs shrink
28-14-7-4-2-1 instead of hitting a zero-size map, and a global average pool makes the classifier
independent of the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hap.models._init import init_weights

__all__ = ["VGG", "VGG16_CONFIG"]

#: Output channels of each 3x3 conv; "M" is a 2x2 max pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """Plain conv stack with max pooling, global average pooling and one linear ``classifier``.

    The classifier is also reachable as ``fc`` (a read-only alias, not a second module), so code that
    looks for ``model.fc`` to exclude the output layer from pruning works on every zoo model.

    Args:
        config: Conv widths and "M" pooling markers, e.g. :data:`VGG16_CONFIG`.
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images.
        batch_norm: Insert BatchNorm after every conv. Convs then have no bias, since BN's shift makes a
            bias redundant and would add exactly flat directions to the Hessian.
    """

    def __init__(
        self,
        config: Sequence[int | str] = VGG16_CONFIG,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            if not isinstance(item, int):
                raise ValueError(f"VGG config entries must be ints or 'M', got {item!r}")
            layers.append(nn.Conv2d(channels, item, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU())
            channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    @property
    def fc(self) -> nn.Linear:
        """The final linear layer (same module as ``classifier``)."""
        return self.classifier

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))
