"""``SmallCNN``: two 3×3 convolutions, two max-pools, two Linear layers."""

from __future__ import annotations

import torch
from torch import nn

from lightning_spectral.models.common import check_input, scaled_width


class SmallCNN(nn.Module):
    """``Conv(→32w) → ReLU → Conv(→64w) → ReLU → MaxPool2 → MaxPool2 → Linear(→256w) → ReLU → Linear``.

    Args:
        num_classes: output logits.
        in_channels: channels of the input image.
        image_size: height and width of the input image, at least 4 (two 2× pools, rounding down).
        width_mult: scales the widths 32, 64 and 256.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        check_input(in_channels, image_size, num_classes, min_size=4)
        c1, c2, hidden = (scaled_width(b, width_mult) for b in (32, 64, 256))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(c2 * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))
