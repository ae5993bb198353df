"""LeNet-300-100 and LeNet-5, the small reference networks of the pruning literature."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import check_common, register_model


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100: flatten -> 300 -> 100 -> classes, ReLU between.

    Input ``(N, C, S, S)``, output logits ``(N, num_classes)``. Layers are ``fc1``, ``fc2``,
    ``fc3``; at 28x28x1 with 10 classes it has 266,610 parameters.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


def lenet5_padding(image_size: int) -> int:
    """conv1 padding that makes the map entering conv2 14x14 for even image sizes up to 32."""
    return max(0, (32 - image_size) // 2)


class LeNet5(nn.Module):
    """LeNet-5 (with ReLU and max pooling, as in pruning papers).

    ``conv1`` (C->6, 5x5, padding ``max(0, (32 - S) // 2)``) -> ReLU -> pool 2 -> ``conv2``
    (6->16, 5x5) -> ReLU -> pool 2 -> flatten -> ``fc1`` (->120) -> ReLU -> ``fc2`` (->84) ->
    ReLU -> ``fc3`` (->classes). Input ``(N, C, S, S)``, output ``(N, num_classes)``. At 28x28
    and 32x32 the map entering ``fc1`` is 16x5x5; at 28x28x1 with 10 classes it has 61,706
    parameters.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        padding = lenet5_padding(image_size)
        # Sizes by arithmetic rather than a dummy forward: conv 5x5 stride 1, then floor pool 2.
        side = (image_size + 2 * padding - 4) // 2
        side = (side - 4) // 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet_300_100")
def lenet_300_100(
    *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28
) -> LeNet300100:
    """LeNet-300-100 for ``(N, in_channels, image_size, image_size)`` input.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> lenet_300_100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return LeNet300100(*check_common(in_channels, num_classes, image_size))


@register_model("lenet5")
def lenet5(*, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> LeNet5:
    """LeNet-5 for ``(N, in_channels, image_size, image_size)`` input.

    Raises:
        ConfigError: an option is not a positive integer.

    Example:
        >>> lenet5(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return LeNet5(*check_common(in_channels, num_classes, image_size))
