"""Width-scalable MLP on flattened images (the source's ``WidthScalableMLP``)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_spectral.models.common import check_input, scaled_width


class MLP(nn.Module):
    """``flatten → [Linear(·, h) → act] × (num_layers − 1) → Linear(h, num_classes)``, h = 256·width_mult.

    Args:
        num_classes: output logits.
        in_channels: channels of the input image.
        image_size: height and width of the (square) input image.
        width_mult: scales the hidden width 256.
        num_layers: number of Linear layers (1 is a linear classifier).
        activation: ``"relu"`` or ``"gelu"``.
        hidden_sizes: explicit hidden widths (e.g. ``[128, 64]``, seed 000's MLP), scaled by
            ``width_mult``; overrides ``num_layers``. ``None``: ``num_layers − 1`` layers of 256.
        bias: biases in the Linear layers (seed 000's MLP has none).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_mult: float = 1.0,
        num_layers: int = 3,
        activation: Literal["relu", "gelu"] = "relu",
        hidden_sizes: list[int] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_input(in_channels, image_size, num_classes)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        act = nn.ReLU if activation == "relu" else nn.GELU
        if hidden_sizes is not None and (not hidden_sizes or min(hidden_sizes) < 1):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got {hidden_sizes}")
        base = hidden_sizes if hidden_sizes is not None else [256] * (num_layers - 1)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for size in base:
            hidden = scaled_width(size, width_mult)
            layers += [nn.Linear(width, hidden, bias=bias), act()]
            width = hidden
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
