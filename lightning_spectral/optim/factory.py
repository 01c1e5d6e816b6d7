"""``create_optimizer``: one call from a model and a type name to an optimizer, over the group rules of
:mod:`.param_groups`."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .budgeted import MuonAdamW, MuonSGD
from .geometric import BlockStiefel, DoublyStochastic, Grassmann, L1Stiefel, Oblique, SLMuon, Symplectic
from .manifold import ManifoldMuon, SpectralBall
from .muon import Muon
from .param_groups import build_param_groups
from .solvers import get_inner_solver

GEOMETRIC = {
    "oblique": Oblique, "sl_muon": SLMuon, "symplectic": Symplectic, "l1_stiefel": L1Stiefel,
    "block_stiefel": BlockStiefel, "doubly_stochastic": DoublyStochastic, "grassmann": Grassmann,
}
OPTIMIZER_TYPES = ("sgd", "adamw", "muon", "muon_sgd", "muon_adamw", "manifold_muon", "spectral_ball", *GEOMETRIC)


def create_optimizer(
    model: nn.Module,
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
    """Build an optimizer for ``model``:
    ``create_optimizer(model, optimizer_type="muon_sgd", inner_solver_type="dual_ascent", lr=0.1, ...)``.

    Parameters are grouped by :func:`~lightning_spectral.optim.param_groups.build_param_groups`
    (``head``, ``head_as_matrix``, ``embeddings_as_matrices`` and ``exclude`` go there): the
    matrix rule takes the hidden matrices; embeddings, the output head (by default the last
    ``nn.Linear``), biases and norms take the fallback rule, with no weight decay on biases and
    norms. For ``"sgd"``/``"adamw"`` the groups only change the weight decay of biases and
    norms. ``inner_solver_type="none"`` or
    ``spectral_budget=None`` turns the budget off. Keyword arguments starting with ``solver_``
    go to the solver (``solver_tangent=True``, ``solver_max_iters=50``); the rest go to the
    optimizer's constructor (``nesterov``, ``betas``, ``mode``, ``fallback_lr``…). The manifold
    optimizers ignore ``momentum``/``weight_decay`` unless they take them (pass ``momentum=`` in
    ``kwargs`` for ManifoldMuon/SpectralBall); their projection keeps the norms bounded.
    """
    if optimizer_type not in OPTIMIZER_TYPES:
        raise ValueError(f"unknown optimizer_type {optimizer_type!r}; choose one of {OPTIMIZER_TYPES}")
    solver_kwargs = {k[len("solver_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("solver_")}
    groups = build_param_groups(model, exclude, head=head, head_as_matrix=head_as_matrix,
                                embeddings_as_matrices=embeddings_as_matrices)
    if inner_solver_type == "none" or spectral_budget is None:
        solver, spectral_budget = None, None
    else:
        solver = get_inner_solver(inner_solver_type, **solver_kwargs)
    if optimizer_type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    if optimizer_type == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if optimizer_type == "muon":
        return Muon(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)
    if optimizer_type == "muon_sgd":
        return MuonSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       spectral_budget=spectral_budget, inner_solver=solver, **kwargs)
    if optimizer_type == "muon_adamw":
        return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, spectral_budget=spectral_budget,
                         inner_solver=solver, **kwargs)
    if optimizer_type == "manifold_muon":
        return ManifoldMuon(groups, lr=lr, **kwargs)
    if optimizer_type == "spectral_ball":
        return SpectralBall(groups, lr=lr, **kwargs)
    return GEOMETRIC[optimizer_type](groups, lr=lr, momentum=momentum, **kwargs)
