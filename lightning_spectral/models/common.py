"""Argument checks shared by the model classes."""

from __future__ import annotations


def scaled_width(base: int, width_mult: float) -> int:
    """``int(base * width_mult)``, truncating (so width 1.5 × 256 = 384 and 0.3 × 64 = 19); at least 1."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    width = int(base * width_mult)
    if width < 1:
        raise ValueError(f"width_mult={width_mult} scales the width {base} down to 0 channels")
    return width


def check_input(in_channels: int, image_size: int, num_classes: int, min_size: int = 1) -> None:
    """Raise ``ValueError`` for a non-positive shape or an image smaller than ``min_size``."""
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if image_size < min_size:
        raise ValueError(f"image_size must be >= {min_size}, got {image_size}")
