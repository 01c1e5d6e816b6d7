"""The networks of the source documents, as plain ``nn.Module``s.

Each takes ``num_classes``, ``in_channels``, ``image_size`` and ``width_mult``; the CLI fills
the first three from the data module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_spectral.models.gpt import GPT
from lightning_spectral.models.mlp import MLP
from lightning_spectral.models.resnet import ResNet18
from lightning_spectral.models.small_cnn import SmallCNN

MODEL_REGISTRY: dict[str, type[nn.Module]] = {"mlp": MLP, "small_cnn": SmallCNN, "resnet18": ResNet18, "gpt": GPT}


def get_model(name: str, num_classes: int = 10, width_mult: float = 1.0, **kwargs: Any) -> nn.Module:
    """Build ``MODEL_REGISTRY[name]``; ``kwargs`` go to its constructor (``in_channels``, ``image_size``, ...)."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](num_classes=num_classes, width_mult=width_mult, **kwargs)


__all__ = ["GPT", "MLP", "MODEL_REGISTRY", "ResNet18", "SmallCNN", "get_model"]
