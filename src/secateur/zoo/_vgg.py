"""The CIFAR-style VGG with BatchNorm used by network-slimming papers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ._registry import check_common, check_width_mult, register_model

VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip


class VGG(nn.Module):
    """VGG for small images: conv 3x3 (no bias) -> BN -> ReLU per number in ``cfg``, 2x2 max
    pooling per ``"M"``, then global average pooling and one Linear head.

    Input ``(N, C, S, S)`` with ``S >= 2 ** (number of "M")``; output ``(N, num_classes)``.
    The conv stack is ``features`` (an ``nn.Sequential``), the head ``classifier`` (a Linear).
    Every conv width is ``max(1, round(width * width_mult))``.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        in_channels: int = 1,
        num_classes: int = 10,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            width = max(1, round(int(item) * width_mult))
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _build(
    name: str,
    cfg: Sequence[int | str],
    in_channels: int,
    num_classes: int,
    image_size: int,
    width_mult: float,
) -> VGG:
    in_channels, num_classes, image_size = check_common(in_channels, num_classes, image_size)
    width_mult = check_width_mult(width_mult)
    pools = sum(1 for item in cfg if item == "M")
    if image_size < 2**pools:
        raise ConfigError(
            f"{name} needs image_size >= {2**pools} (it halves the image {pools} times), "
            f"got {image_size}: upscale the images or choose lenet5 or resnet20"
        )
    return VGG(cfg, in_channels, num_classes, width_mult)


@register_model("vgg11_bn")
def vgg11_bn(
    *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width_mult: float = 1.0
) -> VGG:
    """VGG-11 with BatchNorm, CIFAR style (8 convs, global average pooling, one Linear).

    Raises:
        ConfigError: an option is out of range, or ``image_size`` < 16.

    Example:
        >>> vgg11_bn(width_mult=0.25)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return _build("vgg11_bn", VGG11_CFG, in_channels, num_classes, image_size, width_mult)


@register_model("vgg16_bn")
def vgg16_bn(
    *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width_mult: float = 1.0
) -> VGG:
    """VGG-16 with BatchNorm, CIFAR style (13 convs, global average pooling, one Linear).

    Raises:
        ConfigError: an option is out of range, or ``image_size`` < 16.

    Example:
        >>> vgg16_bn(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _build("vgg16_bn", VGG16_CFG, in_channels, num_classes, image_size, width_mult)
