"""The networks, as plain ``nn.Module``s: ``MLP``, ``SmallCNN`` and ``ResNet18`` for images (or any
input, for the MLP) and ``GPT`` for language modelling.

Their size arguments that a data module knows (``num_classes``, ``input_shape``, ``in_channels``,
``image_size``, ``in_features``, ``vocab_size``, ``block_size``) are filled from it by the CLI
(:func:`lightning_spectral.data.data_arguments`), so no config states them.
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
