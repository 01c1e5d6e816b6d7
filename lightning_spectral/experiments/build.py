"""Objects from a run config without Lightning's parser (for the lr scan): ``{class_path, init_args}`` dicts."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lightning_spectral.data import data_arguments
from lightning_spectral.optim.param_groups import build_param_groups
from lightning_spectral.optim.registry import find_optimizer


def resolve(class_path: str) -> Any:
    """Import ``a.b.C``; a bare name is an optimizer of the registry (its class name or short name,
    ``MuonSGD`` / ``muon_sgd``), else looked up in the package's models, optim, data, then ``torch.optim``."""
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    entry = find_optimizer(class_path)
    if entry is not None:
        return entry.cls
    for module in ("lightning_spectral.models", "lightning_spectral.optim", "lightning_spectral.data", "torch.optim"):
        mod = importlib.import_module(module)
        if hasattr(mod, class_path):
            return getattr(mod, class_path)
    raise ValueError(f"cannot resolve class {class_path!r}")


def _value(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return instantiate(value)
    return value


def instantiate(spec: dict[str, Any] | str, *args: Any, **extra: Any) -> Any:
    if isinstance(spec, str):
        spec = {"class_path": spec}
    kwargs = {k: _value(v) for k, v in (spec.get("init_args") or {}).items()}
    kwargs.update(extra)
    return resolve(spec["class_path"])(*args, **kwargs)


def build_data(config: dict[str, Any]) -> Any:
    data = instantiate(config["data"])
    data.prepare_data()
    data.setup("fit")
    return data


def build_net(config: dict[str, Any], data: Any) -> nn.Module:
    """The run's network, sized by the data module (:func:`~lightning_spectral.data.data_arguments`)."""
    net = config["model"]["init_args"]["net"]
    net = {"class_path": net} if isinstance(net, str) else net
    return instantiate(net, **data_arguments(resolve(net["class_path"]), data))


def build_optimizer(config: dict[str, Any], model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer on ``SpectralModule``'s parameter groups, at learning rate ``lr``."""
    init = config["model"]["init_args"]
    spec = init.get("optimizer", {"class_path": "torch.optim.AdamW"})
    spec = {"class_path": spec} if isinstance(spec, str) else spec
    routing = {key: init[key] for key in ("head", "head_as_matrix", "embeddings_as_matrices") if key in init}
    groups = build_param_groups(model, exclude=init.get("exclude") or [],
                                vector_weight_decay=init.get("vector_weight_decay", 0.0), **routing)
    return instantiate(spec, groups, lr=lr)
