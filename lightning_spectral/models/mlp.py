"""Width-scalable MLP on flattened inputs of any shape."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from lightning_spectral.models.common import check_input, scaled_width


class MLP(nn.Module):
    """``flatten → [Linear(·, h) → act] × (num_layers − 1) → Linear(h, num_classes)``, h = 256·width_mult.

    The input is flattened, so any sample shape works; its size is, in order of precedence,
    ``prod(input_shape)``, ``in_features``, or ``in_channels · image_size²`` (a square image).

    Args:
        num_classes: output logits.
        in_channels: channels of the input image.
        image_size: height and width of the (square) input image.
        width_mult: scales the hidden width 256.
        num_layers: number of Linear layers (1 is a linear classifier).
        activation: ``"relu"`` or ``"gelu"``.
        hidden_sizes: explicit hidden widths (e.g. ``[128, 64]``), scaled by ``width_mult``;
            overrides ``num_layers``. ``None``: ``num_layers − 1`` layers of 256.
        bias: biases in the Linear layers.
        input_shape: shape of one sample without the batch dimension (``(40,)``, ``(3, 32, 32)``).
        in_features: values in one flattened sample.
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
        input_shape: Sequence[int] | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        check_input(in_channels, image_size, num_classes)
        if input_shape is not None:
            if not input_shape or min(input_shape) < 1:
                raise ValueError(f"input_shape must be a non-empty shape of positive sizes, got {input_shape}")
            flat = math.prod(input_shape)
            if in_features is not None and in_features != flat:
                raise ValueError(
                    f"in_features={in_features} disagrees with input_shape={tuple(input_shape)} ({flat} values)")
            in_features = flat
        elif in_features is None:
            in_features = in_channels * image_size * image_size
        elif in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.num_classes = num_classes
        self.in_features = in_features
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        act = nn.ReLU if activation == "relu" else nn.GELU
        if hidden_sizes is not None and (not hidden_sizes or min(hidden_sizes) < 1):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got {hidden_sizes}")
        base = hidden_sizes if hidden_sizes is not None else [256] * (num_layers - 1)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in base:
            hidden = scaled_width(size, width_mult)
            layers += [nn.Linear(width, hidden, bias=bias), act()]
            width = hidden
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
