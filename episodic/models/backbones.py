"""Backbones: image ``[B, C, H, W]`` -> feature ``[B, feat_dim]``.

``conv4``: the few-shot Conv-4 (4 blocks of conv3x3-BN-ReLU-maxpool, 64 channels), global
average pooled at the end so any input size gives 64 features. ``resnet_tiny``: a small
CIFAR-style ResNet (8 basic blocks in 4 stages of widths 16-32-64-128) for CPU work.
``resnet18`` / ``resnet50``: torchvision's models without the fc layer; ``cifar_stem=True``
swaps the 7x7/stride-2 stem and max-pool for a 3x3/stride-1 conv (the SimCLR CIFAR recipe).
Parameter names match torchvision's, so an exported state dict loads into ``torchvision.models``.
"""

from __future__ import annotations

import itertools

import torch
import torchvision
from torch import Tensor, nn

from episodic.errors import check
from episodic.registry import Registry

BACKBONES: Registry = Registry("backbone", None)


def positive(key: str, value: int) -> None:
    """``key=value`` must be an integer >= 1 (one line otherwise)."""
    check(isinstance(value, int) and value >= 1, f"{key}={value!r} is not allowed; use an integer >= 1")


class Backbone(nn.Module):
    """A feature extractor with a known output width ``feat_dim``."""

    feat_dim: int


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


@BACKBONES.register("conv4")
class Conv4(Backbone):
    """Four conv3x3-BN-ReLU-maxpool blocks of ``width`` channels, then global average pooling."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        positive("backbone.params.width", width)
        positive("backbone.params.depth", depth)
        chans = [in_channels] + [width] * depth
        self.features = nn.Sequential(*[_conv_block(a, b) for a, b in itertools.pairwise(chans)])
        self.feat_dim = width

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean((2, 3))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@BACKBONES.register("resnet_tiny")
class ResNetTiny(Backbone):
    """CIFAR-style ResNet with one basic block per stage, widths ``w, 2w, 4w, 8w``."""

    def __init__(self, in_channels: int = 3, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        positive("backbone.params.width", width)
        positive("backbone.params.blocks", blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for i in range(4):
            cout = width * 2**i
            for j in range(blocks):
                layers.append(_Basic(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feat_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x)).mean((2, 3))


class TorchvisionResNet(Backbone):
    """torchvision ResNet without its classifier (``fc`` is an identity)."""

    def __init__(self, arch: str, in_channels: int = 3, cifar_stem: bool = False) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if cifar_stem or in_channels != 3:
            k, s, p = (3, 1, 1) if cifar_stem else (7, 2, 3)
            net.conv1 = nn.Conv2d(in_channels, 64, k, s, p, bias=False)
        if cifar_stem:
            net.maxpool = nn.Identity()
        self.feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        """The state dict under torchvision's names (loads into ``torchvision.models.<arch>``)."""
        return dict(self.net.state_dict())


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3, cifar_stem: bool = False) -> TorchvisionResNet:
    return TorchvisionResNet("resnet18", in_channels, cifar_stem)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int = 3, cifar_stem: bool = False) -> TorchvisionResNet:
    return TorchvisionResNet("resnet50", in_channels, cifar_stem)
