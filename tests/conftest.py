"""Tiny networks whose full Hessian ``torch.func.hessian`` can afford, shared by the tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.softplus(self.bn1(self.conv1(x)))
        x = F.softplus(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """A residual add, and a layer whose input and output channels are coupled (``x + conv(x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.bn0(self.stem(x)))
        x = x + torch.tanh(self.bn(self.conv(x)))
        x = torch.tanh(self.head(x))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


class ConcatDepthwise(nn.Module):
    """Two branches concatenated, then a depthwise conv, then a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], 1)
        x = torch.tanh(self.pw(torch.tanh(self.dw(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test in the tree uses tiny tensors: with intra-op threads on a shared 2-core machine they
    spin-wait and small convs get ~50x slower, so one thread, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


TINY = {"mlp": MLP, "convbn": ConvBN, "residual": Residual, "concat_dw": ConcatDepthwise}


def make_tiny(name: str, n: int = 16, seed: int = 0):
    """(model in float64, inputs, targets) for a tiny net; targets from 3 classes."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TINY[name]().double()
    _randomize_bn(model, gen)
    shape = (n, 5) if name == "mlp" else (n, 1, 8, 8)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    return (request.param, *make_tiny(request.param))
