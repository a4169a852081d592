"""Model zoo: CIFAR-style ResNet, PreResNet, WideResNet and VGG, built by name.

``create("resnet20", num_classes=10, in_channels=1)`` gives a fresh, Kaiming-initialised network. Every
zoo model ends with global average pooling and a linear layer reachable as ``model.fc`` (VGG's is
``classifier``, aliased as ``fc``); :func:`get_classifier` finds it so callers can keep the output layer
out of pruning without knowing the architecture. Shortcuts that change shape are real 1x1 convolutions,
so Torch-Pruning's dependency graph sees every layer a residual channel touches.

Small purpose-built nets for unit tests live in :mod:`hap.models.tiny` and are not registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from hap.models.preresnet import PreResNet
from hap.models.resnet import CifarResNet
from hap.models.vgg import VGG, VGG16_CONFIG
from hap.models.wrn import WideResNet

__all__ = [
    "VGG",
    "CifarResNet",
    "PreResNet",
    "WideResNet",
    "available",
    "create",
    "get_classifier",
    "list_models",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that adds a factory ``fn(num_classes, in_channels, **kw) -> nn.Module`` to the zoo.

    Args:
        name: The name :func:`create` will accept (lower case by convention).

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: If ``name`` is already registered (silently replacing a model would make results
            depend on import order).
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def available() -> list[str]:
    """Alias of :func:`list_models`."""
    return list_models()


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a zoo model by name.

    Args:
        name: One of :func:`list_models` (case-insensitive; ``-`` and ``_`` are interchangeable).
        num_classes: Outputs of the final classifier.
        in_channels: Channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        **kw: Extra constructor arguments of the architecture, e.g. ``widths`` for ResNets or
            ``dropout`` for Wide ResNets.

    Returns:
        A freshly initialised model in training mode.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the valid names.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[key](num_classes=num_classes, in_channels=in_channels, **kw)


def get_classifier(model: nn.Module) -> nn.Module:
    """The output layer to keep out of pruning: ``model.fc`` if it exists, else the last Linear.

    Args:
        model: Any network; zoo models all have ``fc``.

    Returns:
        The classifier module (the same object that lives in ``model``).

    Raises:
        ValueError: If the model has neither ``fc`` nor any ``nn.Linear``.
    """
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Module):
        return fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no 'fc' attribute and no nn.Linear layer")
    return linears[-1]


def _register_resnet(depth: int) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, **kw)

    factory.__doc__ = f"CIFAR ResNet-{depth} (3 stages 16/32/64, option-B projection shortcuts)."
    register_model(f"resnet{depth}")(factory)


for _depth in (20, 32, 56, 110):
    _register_resnet(_depth)


@register_model("preresnet29")
def preresnet29(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """PreResNet-29: pre-activation bottlenecks, widths 16/32/64 x 4 (as in the HAP paper's table)."""
    return PreResNet(29, num_classes=num_classes, in_channels=in_channels, **kw)


@register_model("wrn16_4")
def wrn16_4(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """WRN-16-4: a small Wide ResNet (2 blocks per stage, 64/128/256 channels), for quick runs."""
    return WideResNet(16, 4, num_classes=num_classes, in_channels=in_channels, **kw)


@register_model("wrn32_4")
def wrn32_4(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """HAP's WRN-32: 5 pre-activation blocks per stage, 64/128/256 channels (widen factor 4)."""
    return WideResNet(32, 4, num_classes=num_classes, in_channels=in_channels, **kw)


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """VGG-16 (CIFAR variant, no BatchNorm, single linear classifier)."""
    return VGG(VGG16_CONFIG, num_classes=num_classes, in_channels=in_channels, batch_norm=False, **kw)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """VGG-16 with BatchNorm after every conv (CIFAR variant, single linear classifier)."""
    return VGG(VGG16_CONFIG, num_classes=num_classes, in_channels=in_channels, batch_norm=True, **kw)
