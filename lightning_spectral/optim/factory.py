"""``create_optimizer``: one call from a model (or its parameters) and a type name to an optimizer,
over the table of :mod:`.registry` and the group rules of :mod:`.param_groups`."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .param_groups import build_param_groups
from .registry import OPTIMIZERS, find_optimizer
from .solvers import get_inner_solver

OPTIMIZER_TYPES = tuple(OPTIMIZERS)
"""The ``optimizer_type`` names, in the registry's order (read when this module is imported; the
registry itself, :data:`~lightning_spectral.optim.registry.OPTIMIZERS`, also holds later entries)."""


def create_optimizer(
    model: Union[nn.Module, Iterable[Any]],
    optimizer_type: str = "muon_sgd",
    inner_solver_type: str = "spectral_clip",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    spectral_budget: Optional[float] = 0.1,
    *,
    head: Optional[Sequence[str]] = None,
    head_as_matrix: bool = False,
    embeddings_as_matrices: bool = False,
    exclude: Sequence[str] = (),
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer:
    ``create_optimizer(model, optimizer_type="muon_sgd", inner_solver_type="dual_ascent", lr=0.1, ...)``.

    ``model`` is an ``nn.Module``, or what any optimizer takes: an iterable of parameters, of
    ``(name, parameter)`` pairs or of group dicts (as timm's ``create_optimizer_v2``).
    ``optimizer_type`` is a name of :data:`~lightning_spectral.optim.registry.OPTIMIZERS`
    (``"muon"``, ``"muon_sgd"``, ``"oblique"``...) or its class name (``"MuonSGD"``).

    A module's parameters are grouped by :func:`~lightning_spectral.optim.param_groups.build_param_groups`
    (``head``, ``head_as_matrix``, ``embeddings_as_matrices`` and ``exclude`` go there): the
    matrix rule takes the hidden matrices; embeddings, the output head (by default the last
    ``nn.Linear``), biases and norms take the fallback rule, with no weight decay on biases and
    norms. Parameters or groups are passed on as they are (the optimizer splits a group without a
    ``matrix`` key by ``ndim``). For ``"sgd"``/``"adamw"`` the groups only change the weight decay
    of biases and norms.

    Each class is given those of ``lr``, ``momentum``, ``weight_decay`` and ``spectral_budget``
    (with the solver) its registry entry lists (``factory_args``): the manifold optimizers take
    only ``lr`` (pass ``momentum=`` in ``kwargs`` for ManifoldMuon/SpectralBall), the geometric
    ones ``lr`` and ``momentum``. ``inner_solver_type="none"`` or ``spectral_budget=None`` turns
    the budget off. Keyword arguments starting with ``solver_`` go to the solver
    (``solver_tangent=True``, ``solver_max_iters=50``); the rest go to the optimizer's
    constructor (``nesterov``, ``betas``, ``mode``, ``fallback_lr``…).
    """
    entry = find_optimizer(optimizer_type)
    if entry is None:
        raise ValueError(f"unknown optimizer_type {optimizer_type!r}; choose one of {tuple(OPTIMIZERS)} "
                         "(or one of their class names)")
    solver_kwargs = {k[len("solver_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("solver_")}
    if inner_solver_type == "none" or spectral_budget is None:
        solver, spectral_budget = None, None
    else:
        solver = get_inner_solver(inner_solver_type, **solver_kwargs)
    if isinstance(model, nn.Module):
        groups: Any = build_param_groups(model, exclude, head=head, head_as_matrix=head_as_matrix,
                                         embeddings_as_matrices=embeddings_as_matrices)
    else:
        routing = dict(head=head, head_as_matrix=head_as_matrix, embeddings_as_matrices=embeddings_as_matrices,
                       exclude=tuple(exclude))
        given = [k for k, v in routing.items() if v not in (None, False, ())]
        if given:
            raise ValueError(f"create_optimizer: {', '.join(given)} route a model's modules, but it was given "
                             "parameters; pass the nn.Module, or build the groups yourself")
        if isinstance(model, torch.Tensor):
            raise TypeError("create_optimizer: pass a model, an iterable of parameters or of groups, not one tensor")
        groups = list(model)
    common: dict[str, Any] = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    args = {k: common[k] for k in entry.factory_args if k in common}
    if "spectral_budget" in entry.factory_args:
        args.update(spectral_budget=spectral_budget, inner_solver=solver)
    return entry.cls(groups, **args, **kwargs)
