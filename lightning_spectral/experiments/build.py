"""Objects from a run config without Lightning's parser (for the lr scan): ``{class_path, init_args}`` dicts.

What a path may name follows :mod:`lightning_spectral.config_policy`, as under the CLI: a class of
the kind asked for (a data module, a network, an optimizer; a nested spec the kind its parameter's
annotation names), or a function that code registered.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import nn

from lightning_spectral.config_policy import ConfigObjectRefused, check_named_object
from lightning_spectral.data import data_arguments
from lightning_spectral.optim.param_groups import build_param_groups
from lightning_spectral.optim.registry import find_optimizer

_UNIONS = (typing.Union, types.UnionType)


def resolve(class_path: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """Import ``a.b.C``; a bare name is an optimizer of the registry (its class name or short name,
    ``MuonSGD`` / ``muon_sgd``), else looked up in the package's models, optim, data, then ``torch.optim``.

    Raises:
        ConfigObjectRefused: the path names neither a class (of ``kind``) nor a registered function.
    """
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return check_named_object(class_path, getattr(importlib.import_module(module), name), kind)
    entry = find_optimizer(class_path)
    if entry is not None:
        return check_named_object(class_path, entry.cls, kind)
    for module in ("lightning_spectral.models", "lightning_spectral.optim", "lightning_spectral.data", "torch.optim"):
        mod = importlib.import_module(module)
        if hasattr(mod, class_path):
            return check_named_object(class_path, getattr(mod, class_path), kind)
    raise ValueError(f"cannot resolve class {class_path!r}")


def _parameter_kinds(cls: Any, name: str) -> tuple[type, ...]:
    """The classes that parameter ``name`` of ``cls`` is annotated with (``C``, ``C | str | None``):
    the kinds a nested spec may build."""
    try:
        hint = typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls).get(name)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate names no kind
        hint = None
    kinds = tuple(h for h in (typing.get_args(hint) if typing.get_origin(hint) in _UNIONS else (hint,))
                  if inspect.isclass(h) and h not in (str, type(None), object))
    if not kinds:
        raise ConfigObjectRefused(f"{name!r} of {getattr(cls, '__qualname__', cls)} is given a {{class_path: ...}}, but "
                                  "its annotation names no class, so nothing says what kind of object it may build; "
                                  "run it through the CLI, whose parser reads the annotation, or give a plain value")
    return kinds


def instantiate(spec: dict[str, Any] | str, *args: Any, kind: type | tuple[type, ...] | None = None,
                **extra: Any) -> Any:
    """``spec``'s class (of ``kind``) built with ``args``, its ``init_args`` (nested specs built the
    same way, of the kind their parameter's annotation names) and ``extra``."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    cls = resolve(spec["class_path"], kind)
    kwargs = {k: instantiate(v, kind=_parameter_kinds(cls, k)) if isinstance(v, dict) and "class_path" in v else v
              for k, v in (spec.get("init_args") or {}).items()}
    kwargs.update(extra)
    return cls(*args, **kwargs)


def build_data(config: dict[str, Any]) -> Any:
    data = instantiate(config["data"], kind=LightningDataModule)
    data.prepare_data()
    data.setup("fit")
    return data


def build_net(config: dict[str, Any], data: Any) -> nn.Module:
    """The run's network, sized by the data module (:func:`~lightning_spectral.data.data_arguments`)."""
    net = config["model"]["init_args"]["net"]
    net = {"class_path": net} if isinstance(net, str) else net
    return instantiate(net, kind=nn.Module, **data_arguments(resolve(net["class_path"], nn.Module), data))


def build_optimizer(config: dict[str, Any], model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer on ``SpectralModule``'s parameter groups, at learning rate ``lr``."""
    init = config["model"]["init_args"]
    spec = init.get("optimizer", {"class_path": "torch.optim.AdamW"})
    spec = {"class_path": spec} if isinstance(spec, str) else spec
    routing = {key: init[key] for key in ("head", "head_as_matrix", "embeddings_as_matrices") if key in init}
    groups = build_param_groups(model, exclude=init.get("exclude") or [],
                                vector_weight_decay=init.get("vector_weight_decay", 0.0), **routing)
    return instantiate(spec, groups, kind=torch.optim.Optimizer, lr=lr)
