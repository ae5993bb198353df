"""The CIFAR ResNets of He et al. 2016 (depth 6n+2), with projection shortcuts (option B)."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import check_common, register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    ``shortcut`` is an ``nn.Sequential``: a 1x1 conv (no bias) + BN projection when the stride
    is not 1 or the width changes, empty (identity) otherwise. Input ``(N, in_planes, H, W)``,
    output ``(N, planes, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with ``6 * blocks_per_stage + 2`` weighted layers.

    Stem ``conv1`` (3x3, C->16, no bias) + ``bn1`` + ReLU; stages ``layer1``, ``layer2``,
    ``layer3`` of ``blocks_per_stage`` :class:`BasicBlock` s with widths 16, 32, 64 (stride 2
    at the first block of layers 2 and 3); global average pooling; ``fc`` (64 -> classes).
    Input ``(N, C, S, S)``, output ``(N, num_classes)``.

    Shortcuts use option B of the paper, a 1x1 conv + BN projection where the shape changes,
    rather than option A's zero padding: a real conv shortcut keeps the channel coupling
    between a block's output and its shortcut explicit, which structural pruning has to follow.
    This adds 2,752 parameters to ResNet-20 (269,722 -> 272,474 at 32x32x3 with 10 classes).
    """

    def __init__(self, blocks_per_stage: int, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def _resnet(blocks: int, in_channels: int, num_classes: int, image_size: int) -> ResNet:
    in_channels, num_classes, _ = check_common(in_channels, num_classes, image_size)
    return ResNet(blocks, in_channels, num_classes)


@register_model("resnet20")
def resnet20(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> ResNet:
    """ResNet-20 (3 blocks per stage), about 0.27M parameters.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> resnet20(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _resnet(3, in_channels, num_classes, image_size)


@register_model("resnet32")
def resnet32(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> ResNet:
    """ResNet-32 (5 blocks per stage), about 0.47M parameters.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> resnet32()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return _resnet(5, in_channels, num_classes, image_size)


@register_model("resnet44")
def resnet44(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> ResNet:
    """ResNet-44 (7 blocks per stage), about 0.66M parameters.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> resnet44()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return _resnet(7, in_channels, num_classes, image_size)


@register_model("resnet56")
def resnet56(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> ResNet:
    """ResNet-56 (9 blocks per stage), about 0.86M parameters.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> resnet56()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return _resnet(9, in_channels, num_classes, image_size)
