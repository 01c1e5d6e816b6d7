"""ResNet-18, CIFAR variant: 3×3 stride-1 stem, no max-pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_spectral.models.common import check_input, scaled_width


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1 conv-BN shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Stages of 2 BasicBlocks with widths ``b, 2b, 4b, 8b`` (``b = 64·width_mult``), strides 1, 2, 2, 2.

    Convolutions are bias-free with Kaiming-normal (fan-out) init; BatchNorm starts at (1, 0).

    Args:
        num_classes: output logits.
        in_channels: channels of the input image.
        image_size: height and width of the input image (any size: the head pools globally).
        width_mult: scales the base width 64.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        check_input(in_channels, image_size, num_classes)
        base = scaled_width(64, width_mult)
        self.conv1 = nn.Conv2d(in_channels, base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        stages, in_planes = [], base
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = base * 2**i
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
