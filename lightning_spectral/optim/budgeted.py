"""MuonSGD and MuonAdamW: a base rule proposes a raw step, an inner solver fits it to a
spectral budget.

For each matrix ``W`` the base rule (momentum SGD or AdamW) proposes ``Δ``; the step taken is
``A* = argmin ‖A − Δ‖_F s.t. ‖A‖₂ ≤ η [, WᵀA + AᵀW = 0]`` (see :mod:`.solvers`). Limits:
``η → ∞`` is plain SGD/AdamW; ``‖Δ‖₂ ≫ η`` gives ``η·msign(Δ)``, Muon with step ``η``.

``spectral_budget`` is an absolute bound on the spectral norm of each matrix's per-step change
(not multiplied by lr, not scaled by shape). Decision: by default the budget
follows the learning-rate schedule (``η_t = η · lr_t / lr_0``, ``lr_0`` the group's
``initial_lr`` that torch schedulers record), so a cosine schedule anneals the Muon-like regime
too; ``budget_follows_lr=False`` keeps it fixed.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch

from .base import MatrixOptimizer, check_positive, check_unit_interval, record_inner
from .solvers import InnerSolver, SpectralClipSolver, get_inner_solver


def resolve_solver(inner_solver: Union[InnerSolver, str, None]) -> InnerSolver:
    if inner_solver is None:
        return SpectralClipSolver()
    if isinstance(inner_solver, str):
        return get_inner_solver(inner_solver)
    if not isinstance(inner_solver, InnerSolver):
        raise TypeError(f"inner_solver must be an InnerSolver, a registry name or None, got {type(inner_solver).__name__}")
    return inner_solver


class BudgetedOptimizer(MatrixOptimizer):
    """Shared part of MuonSGD/MuonAdamW: the budget, the solver and its bookkeeping."""

    def __init__(self, params, defaults, inner_solver, **kwargs):
        budget = defaults["spectral_budget"]
        if budget is not None:
            check_positive(type(self).__name__, spectral_budget=budget)
        self.inner_solver = resolve_solver(inner_solver)
        super().__init__(params, defaults, **kwargs)

    @staticmethod
    def budget(group: dict[str, Any]) -> Optional[float]:
        """The bound ``η_t`` on ``‖ΔW‖₂`` of a matrix group's next step (``None``: unbudgeted):
        ``spectral_budget``, times ``lr/initial_lr`` when it follows the schedule."""
        budget = group["spectral_budget"]
        if budget is not None and group["budget_follows_lr"] and group.get("initial_lr"):
            budget = budget * float(group["lr"]) / float(group["initial_lr"])
        return budget

    # The step in the three parts of MatrixOptimizer: the base rule elementwise (_pre_step gives
    # its raw step Δ), the solver on the whole matrix, the step added elementwise.
    def _needs_whole(self, group: dict[str, Any]) -> bool:
        return self.budget(group) is not None

    def _needs_weight(self, group: dict[str, Any]) -> bool:
        return self.inner_solver.tangent  # the tangent space at W

    def _whole_step(self, group: dict[str, Any], W: Optional[torch.Tensor], M: torch.Tensor,
                    states: list[dict]) -> torch.Tensor:
        """The solver's step for each raw step ``M[i]``, one matrix at a time (without tangency the
        solver does not read ``W``: ``M[i]`` stands in for it)."""
        return torch.stack([self._constrain(group, M[i] if W is None else W[i], M[i], states[i])
                            for i in range(M.shape[0])])

    def _apply_step(self, group: dict[str, Any], p: torch.Tensor, result: torch.Tensor, shape: torch.Size) -> None:
        p.add_(result.reshape(p.shape))

    # Run eagerly under torch.compile: the solvers read norms back to the host (graph breaks), and
    # torch 2.14's dynamo resumes such a break inside this call with another parameter's tensors
    # (measured: 'W and delta must have the same shape' at the second compiled step).
    @torch.compiler.disable
    def _constrain(self, group: dict[str, Any], W: torch.Tensor, delta: torch.Tensor, state: dict) -> torch.Tensor:
        step = self.inner_solver(W, delta, self.budget(group), state=state)
        info = self.inner_solver.last_info
        record_inner(state, info.iterations, info.tangent_residual)
        return step

    def constraint_report(self, names: Optional[Mapping[torch.Tensor, str]] = None) -> dict[str, dict[str, float]]:
        """Per matrix parameter (named as in :meth:`MatrixOptimizer.constraint_report`),
        ``inner_iterations`` and ``inner_residual`` (tangency) of its last solve, and ``closed_form``:
        1 when that step was a formula with no iteration (the exact singular-value clip without
        tangency, or SpectralClipSolver's rescale), 0 when the solver iterated."""
        report = super().constraint_report(names)
        for entry in report.values():
            if "inner_iterations" in entry:
                entry["closed_form"] = float(entry["inner_iterations"] == 0)
        return report


class MuonSGD(BudgetedOptimizer):
    """Momentum SGD whose matrix steps are fitted to a spectral budget.

    ``d = g + wd·W`` (coupled L2, inside the budget, as ``torch.optim.SGD``), ``b ← μ b + (1 −
    dampening) d`` (``b₀ = d``), ``d ← d + μ b`` with Nesterov else ``b``; ``Δ = −lr·d``;
    ``W ← W + solver(W, Δ, η)``. Non-matrix tensors take the same SGD step unconstrained: the
    fallback (``**kwargs``: the fallback arguments and ``check_finite`` of
    :class:`~lightning_spectral.optim.base.MatrixOptimizer`) is this same SGD by default, at this
    optimizer's lr, momentum, Nesterov flag and weight decay; ``fallback="adamw"`` makes it the
    auxiliary AdamW.

    Args:
        spectral_budget: ``η``; ``None`` disables the solver (plain SGD).
        inner_solver: an :class:`~lightning_spectral.optim.solvers.InnerSolver`, a registry
            name (``"dual_ascent"``…) or ``None`` (``SpectralClipSolver()``).
        budget_follows_lr: scale ``η`` by ``lr/initial_lr`` (see the module docstring).
    """

    base_rule = "sgd"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        spectral_budget: Optional[float] = None,
        inner_solver: Union[InnerSolver, str, None] = None,
        nesterov: bool = False,
        dampening: float = 0.0,
        budget_follows_lr: bool = True,
        **kwargs: Any,
    ):
        check_unit_interval("MuonSGD", momentum=momentum)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("MuonSGD: Nesterov momentum requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, spectral_budget=spectral_budget,
                        nesterov=nesterov, dampening=dampening, budget_follows_lr=budget_follows_lr)
        super().__init__(params, defaults, inner_solver, **kwargs)

    def _pre_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """The SGD step ``Δ = −lr·d`` (``p``, ``grad`` and the buffer may be shards)."""
        mu, wd = group["momentum"], group["weight_decay"]
        d = grad.add(p, alpha=wd) if wd else grad
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone()
            else:
                buf.mul_(mu).add_(d, alpha=1.0 - group["dampening"])
            d = d.add(buf, alpha=mu) if group["nesterov"] else buf
        return d.mul(-group["lr"])


class MuonAdamW(BudgetedOptimizer):
    """AdamW whose matrix steps are fitted to a spectral budget.

    ``W ← (1 − lr·wd) W`` (decoupled, outside the budget), ``m, v`` Adam moments,
    ``Δ = −lr · m̂ / (√v̂ + ε)`` with bias corrections ``m̂ = m/(1−β₁ᵗ)``, ``v̂ = v/(1−β₂ᵗ)``;
    ``W ← W + solver(W, Δ, η)``. Non-matrix tensors take the plain AdamW step: the fallback
    (``**kwargs``, as :class:`MuonSGD`) is this same AdamW by default, at this optimizer's lr,
    betas, eps and weight decay.
    """

    base_rule = "adamw"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        spectral_budget: Optional[float] = None,
        inner_solver: Union[InnerSolver, str, None] = None,
        budget_follows_lr: bool = True,
        **kwargs: Any,
    ):
        check_unit_interval("MuonAdamW", beta1=betas[0], beta2=betas[1])
        check_positive("MuonAdamW", eps=eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        spectral_budget=spectral_budget, budget_follows_lr=budget_follows_lr)
        super().__init__(params, defaults, inner_solver, **kwargs)

    _elementwise_state = ("step", "exp_avg", "exp_avg_sq")

    def _pre_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """The moments, the decoupled decay of ``p``, and the AdamW step ``Δ`` (elementwise)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        delta = state["exp_avg"].div(denom).mul_(-lr / (1.0 - beta1**t))
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])  # before the solver: its W is the decayed one
        return delta
