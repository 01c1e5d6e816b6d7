"""Parameter-group rules, in one place.

Every optimizer of this package, and the LightningModule, split a model's parameters the
same way: tensors with two or more dimensions (linear weights, conv kernels viewed as
``out × (in·kh·kw)``) follow the optimizer's *matrix rule*; everything else (biases, norm
gains, scalars) follows its *fallback rule* (AdamW or SGD inside the same optimizer object).

A group says which rule it wants with the key ``"matrix"``. Groups without the key are
split by ``ndim`` when an optimizer of this package is built, so
``MuonSGD(model.parameters())`` does the right thing. Plain ``torch.optim`` optimizers
ignore the extra keys, so the same groups work with ``torch.optim.SGD`` and ``AdamW``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Sequence

import torch
from torch import nn

MATRIX_KEY = "matrix"


def is_matrix(p: torch.Tensor) -> bool:
    """A tensor the matrix rule can take: 2-D, or N-D viewed as ``shape[0] × rest``."""
    return p.ndim >= 2


def build_param_groups(
    model: nn.Module,
    exclude: Sequence[str] = (),
    vector_weight_decay: float | None = 0.0,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a matrix group and a fallback group.

    Args:
        model: the network.
        exclude: glob patterns over parameter names (``"fc.*"``, ``"*.downsample.*"``) whose
            matrices go to the fallback rule anyway (e.g. a classifier head or embedding).
        vector_weight_decay: weight decay for the fallback group; ``0.0`` (the default) is
            the usual "no decay on biases and norms"; ``None`` keeps the optimizer's own value.

    Returns:
        Non-empty groups, each with ``params``, ``param_names``, ``name`` and ``matrix`` keys.
    """
    matrices: list[tuple[str, nn.Parameter]] = []
    others: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
        (matrices if is_matrix(p) and not excluded else others).append((name, p))
    groups: list[dict[str, Any]] = []
    if matrices:
        groups.append(_group(matrices, "matrix", True))
    if others:
        group = _group(others, "vector", False)
        if vector_weight_decay is not None:
            group["weight_decay"] = vector_weight_decay
        groups.append(group)
    return groups


def _group(named: list[tuple[str, nn.Parameter]], name: str, matrix: bool) -> dict[str, Any]:
    return {
        "params": [p for _, p in named],
        "param_names": [n for n, _ in named],
        "name": name,
        MATRIX_KEY: matrix,
    }


def split_by_rule(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise ``params`` (tensors, ``(name, tensor)`` pairs or group dicts) into groups
    that each carry ``"matrix"``: a group without the key is split by ``ndim``.

    Raises:
        ValueError: a group marked ``matrix=True`` holds a tensor with fewer than two
            dimensions (a matrix rule cannot take a bias or a scalar).
    """
    groups = _as_groups(params)
    out: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        if MATRIX_KEY in group:
            if group[MATRIX_KEY]:
                for i, p in enumerate(group["params"]):
                    if not is_matrix(p):
                        name = _name_of(group, i)
                        raise ValueError(
                            f"param group {index} is marked matrix=True but {name} has shape "
                            f"{tuple(p.shape)}: the matrix rule needs tensors with ndim >= 2. "
                            "Move it to a group with matrix=False (the AdamW/SGD fallback), "
                            "or leave out the 'matrix' key to split by ndim."
                        )
            out.append(group)
            continue
        for flag in (True, False):
            keep = [i for i, p in enumerate(group["params"]) if is_matrix(p) == flag]
            if not keep:
                continue
            sub = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            sub["params"] = [group["params"][i] for i in keep]
            if "param_names" in group:
                sub["param_names"] = [group["param_names"][i] for i in keep]
            sub[MATRIX_KEY] = flag
            out.append(sub)
    if not out:
        raise ValueError("optimizer got an empty parameter list")
    return out


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params should be an iterable of tensors or dicts, not a single tensor: "
            "pass [tensor] or model.parameters()"
        )
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        groups = []
        for g in items:
            g = dict(g)
            plist = g["params"]
            plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
            if plist and all(isinstance(x, tuple) for x in plist):
                g["param_names"] = [n for n, _ in plist]
                plist = [p for _, p in plist]
            g["params"] = plist
            groups.append(g)
        return groups
    if all(isinstance(x, tuple) for x in items):
        return [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
    return [{"params": items}]


def _name_of(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    return f"parameter '{names[i]}'" if names else f"parameter #{i}"
