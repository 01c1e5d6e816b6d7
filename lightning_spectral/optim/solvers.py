"""Inner solvers of the budgeted optimizers (:mod:`.budgeted`).

Every solver answers the same convex problem, so they can be compared on cost and accuracy
against one exact answer::

    A* = argmin ‖A − Δ‖_F   s.t.   ‖A‖₂ ≤ η,   [ WᵀA + AᵀW = 0  when built with tangent=True ]

``Δ`` is the base rule's raw *descent* step (``−lr·d``), ``η`` the spectral budget; ``A*`` is
the feasible step nearest to it (minimising ``⟨Δ, A⟩`` instead would step uphill, since ``Δ`` is
already a descent step).
Without the tangency constraint the answer is singular-value clipping ``U min(Σ, η) Vᵀ``, which
the three dual/splitting solvers return at once (their multiplier lives on the tangency
constraint, so without it there is nothing to iterate). With it they iterate:

- :class:`SpectralClipSolver`: tangent projection, then a uniform rescale into the ball. Cheap,
  feasible, not optimal: the baseline.
- :class:`FrankWolfeSolver`: projection-free; pairwise (away-step) conditional gradient with the
  spectral-ball linear oracle ``−η·msign(∇)``, exact line search, linear convergence; with
  tangency, the dual ascent below with this Frank–Wolfe as its ball projection.
- :class:`DualAscentSolver`: Nesterov-accelerated gradient ascent (with restart) on the symmetric
  multiplier ``X`` of the tangency constraint; for a given ``X`` the primal answer is
  ``clip(Δ − W X)``; step ``1/‖W‖₂²`` (the dual gradient's Lipschitz constant).
- :class:`QuasiNewtonDualSolver`: the same dual, maximised with ``torch.optim.LBFGS``.
- :class:`ADMMSolver`: splits the tangent space (``A``) from the ball (``Z``), scaled dual ``U``,
  residual-balancing penalty ``ρ``.

All end with the same feasibility restoration (project onto the tangent space, rescale into the
ball), so every returned step is feasible to round-off. Warm starts (multipliers, ADMM's
``Z, U, ρ``) live in the ``state`` dict the caller passes (the optimizer's ``self.state[p]``,
keys prefixed ``solver_``), so they are checkpointed with the optimizer. After each call
``solver.last_info`` holds iterations and residuals, and ``closed_form``: whether the step came
from a formula with no iteration (the exact clip without tangency, or the rescale of
:class:`SpectralClipSolver`), so a log can tell "dual ascent" that never iterated from one that did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .linalg import (
    TangentSpace,
    as_matrix,
    minimize_lbfgs,
    orient,
    rescale_into_ball,
    spectral_clip,
    spectral_norm,
    sym,
)
from .msign import msign


@dataclass
class SolveInfo:
    """``iterations``: inner iterations (clip or msign evaluations); ``tangent_residual``:
    scale-free ``‖sym(WᵀA)‖_F/(‖W‖₂‖A‖_F)`` of the returned step (0 without tangency);
    ``norm_excess``: ``max(0, ‖A‖₂/η − 1)`` of the returned step (0 up to round-off: every
    solver ends with the rescale into the ball, whose norm it computes once); ``closed_form``:
    the step is a formula, no iteration ran (``iterations == 0``)."""

    iterations: int
    tangent_residual: float
    norm_excess: float
    closed_form: bool = False


class InnerSolver:
    """Base class: orientation, validation, feasibility restoration and bookkeeping.

    Args:
        tangent: also keep the step in ``{A : WᵀA + AᵀW = 0}`` (the Stiefel tangent space at
            ``W``; for any ``W``, the moves that leave ``WᵀW`` unchanged to first order).
        tol: relative stopping tolerance of the iteration.
        max_iters: iteration cap.
        clip_method: ``"svd"`` (exact clipping) or ``"msign"`` (SVD-free clipping by two
            Polar-Express msign calls; faster on GPUs, accurate to about 1e-3).
    """

    name = "base"

    def __init__(self, tangent: bool = False, tol: float = 1e-6, max_iters: int = 100,
                 clip_method: str = "svd"):
        if tol <= 0 or not math.isfinite(tol):
            raise ValueError(f"{type(self).__name__}: tol must be a positive number, got {tol!r}")
        if int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"{type(self).__name__}: max_iters must be a positive integer, got {max_iters!r}")
        if clip_method not in ("svd", "msign"):
            raise ValueError(f"{type(self).__name__}: clip_method must be 'svd' or 'msign', got {clip_method!r}")
        self.tangent = tangent
        self.tol = tol
        self.max_iters = int(max_iters)
        self.clip_method = clip_method
        self.last_info: Optional[SolveInfo] = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tangent={self.tangent}, tol={self.tol}, "
                f"max_iters={self.max_iters}, clip_method={self.clip_method!r})")

    @torch.no_grad()
    def __call__(self, W: torch.Tensor, delta: torch.Tensor, spectral_budget: float,
                 state: Optional[dict] = None) -> torch.Tensor:
        """Return the feasible step nearest to ``delta`` (same shape and dtype as ``delta``)."""
        if spectral_budget is None or not spectral_budget > 0 or not math.isfinite(spectral_budget):
            raise ValueError(f"spectral_budget must be a positive number, got {spectral_budget!r}")
        if W.shape != delta.shape:
            raise ValueError(f"W and delta must have the same shape, got {tuple(W.shape)} and {tuple(delta.shape)}")
        work = torch.float64 if delta.dtype == torch.float64 else torch.float32
        flip, (Wt, Dt) = orient(as_matrix(W).to(work), as_matrix(delta).to(work))
        space = TangentSpace(Wt) if self.tangent else None
        state = {} if state is None else state
        if space is None and self.exact_without_tangent:
            A, iterations = self.clip(Dt, spectral_budget), 0
        else:
            A, iterations = self._solve(Wt, Dt, float(spectral_budget), space, state)
        if space is not None:
            A = space.project(A)
        if iterations == 0 and space is None and self.clip_method == "svd" and self.exact_without_tangent:
            excess = 0.0  # an exact clip: its singular values are min(σ, η) by construction
        else:
            norm = float(spectral_norm(A))
            if norm > spectral_budget:
                A = A * (spectral_budget / norm)
            excess = max(0.0, min(norm, spectral_budget) / spectral_budget - 1.0)
        self.last_info = SolveInfo(
            iterations=iterations,
            tangent_residual=float(space.residual(A)) if space is not None else 0.0,
            norm_excess=excess,
            closed_form=iterations == 0,
        )
        return (A.mT if flip else A).reshape(delta.shape).to(delta.dtype)

    exact_without_tangent = True

    def clip(self, M: torch.Tensor, budget: float) -> torch.Tensor:
        return spectral_clip(M, budget, self.clip_method)

    def _solve(self, W, D, budget, space, state) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class SpectralClipSolver(InnerSolver):
    """``Δ · min(1, η/‖Δ‖₂)`` after the tangent projection: the cheap, inexact baseline."""

    name = "spectral_clip"
    exact_without_tangent = False

    def _solve(self, W, D, budget, space, state):
        return (space.project(D) if space is not None else D), 0


def _accelerated_dual_ascent(W, D, budget, space, state, project_ball, max_iters, tol):
    """Nesterov-accelerated gradient ascent (with a gradient restart) on the dual of the tangency
    constraint, ``g(X) = min_{‖A‖₂≤η} ½‖A − Δ‖² + ⟨X, WᵀA⟩``: ``A(X) = Π_ball(Δ − W X)``,
    ``∇g = sym(Wᵀ A(X))``, step ``1/‖W‖₂²`` (the dual gradient's Lipschitz constant). Warm start and
    result in ``state["solver_dual"]``; stops when the tangency residual of ``A(X)`` is below
    ``tol``. ``project_ball(M, η, accuracy)`` may be inexact to the relative ``accuracy`` asked,
    which follows the residual down (an inexact dual method needs exact projections only at the
    end). Returns ``(A, iterations)``."""
    step = 1.0 / max(space.norm**2, 1e-30)
    X = state.get("solver_dual")
    X = torch.zeros(W.shape[1], W.shape[1], dtype=D.dtype, device=D.device) if X is None else X.to(D)
    Y, t, residual = X, 1.0, 1.0
    for k in range(max_iters):
        A = project_ball(D - W @ Y, budget, max(tol, 0.1 * residual))
        grad = space.constraint(A)
        residual = float(space.residual(A))
        if residual < tol:
            X = Y
            break
        X_next = Y + step * grad
        if float((grad * (X_next - X)).sum()) < 0:  # restart: momentum points downhill
            t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Y = X_next + ((t - 1.0) / t_next) * (X_next - X)
        X, t = X_next, t_next
    state["solver_dual"] = X
    return A, k + 1


class FrankWolfeSolver(InnerSolver):
    """Projection-free: the ball projection ``Π_ball(M) = argmin_{‖A‖₂≤η} ½‖A − M‖²`` by pairwise
    (away-step) conditional gradient, with the spectral-ball linear oracle ``S = −η·msign(A − M)``.

    The iterate is a convex combination of feasible atoms (started from ``M·min(1, η/‖M‖₂)``);
    each step moves weight from the *away* atom ``V = argmaxᵢ ⟨A − M, Vᵢ⟩`` to ``S`` along
    ``S − V`` with exact line search, capped by ``V``'s weight. Plain Frank–Wolfe zig-zags
    towards the face of the solution and converges as O(1/k) (measured: 1e-2 from the SVD clip
    after 100 iterations); the pairwise step converges linearly here, because every atom and
    iterate shares ``M``'s singular vectors, so the ball acts as the box ``[−η, η]^r`` on the
    singular values, a polytope. Stops when the Frank–Wolfe gap ``⟨A − M, A − S⟩`` (≥ the
    objective error ≥ ½‖A − A*‖²) is below ``max(tol², eps)·‖M‖²`` (float64): a relative
    distance to the clip ≲ tol. Measured from ``η = 0.3‖M‖₂`` on 12 Gaussian cases: 1e-3 … 2e-2
    after 10 steps, 3e-11 … 7e-5 after 40, round-off after 160. Known slow case: a singular
    value of ``M`` within ~1e-3 of ``η`` (the box is then nearly degenerate and the iteration
    sensitive to round-off): 3.6e-4 after 160 steps on one such 24×16 case.

    With tangency the linear oracle over ball ∩ tangent space has no closed form (it is the
    manifold-Muon problem), and an approximate one stalls the gap; instead the tangency
    constraint is dualised exactly as in :class:`DualAscentSolver` and each dual step's ball
    projection is this Frank–Wolfe.

    ``iterations`` counts linear-oracle calls (one msign each). ``max_iters`` caps the dual
    steps, ``fw_iters`` the Frank–Wolfe steps per projection. Memory: up to ``max_atoms``
    (default ``fw_iters + 1``) float64 matrices of ``Δ``'s size during a projection, none kept
    after it. Below that cap the two lightest atoms are merged into their weighted mean, a
    feasible point, so the combination stays exact; but merged atoms are no longer vertices and
    the rate suffers (measured on 48×32: 64 atoms 1e-5 in 160 steps, 16 atoms 4e-4 in 1000).
    """

    name = "frank_wolfe"
    exact_without_tangent = False

    def __init__(self, tangent: bool = False, tol: float = 1e-6, max_iters: int = 500,
                 clip_method: str = "svd", fw_iters: int = 100, max_atoms: Optional[int] = None):
        super().__init__(tangent, tol, max_iters, clip_method)
        if int(fw_iters) != fw_iters or fw_iters < 1:
            raise ValueError(f"FrankWolfeSolver: fw_iters must be a positive integer, got {fw_iters!r}")
        if max_atoms is not None and (int(max_atoms) != max_atoms or max_atoms < 2):
            raise ValueError(f"FrankWolfeSolver: max_atoms must be None or an integer ≥ 2, got {max_atoms!r}")
        self.fw_iters = int(fw_iters)
        self.max_atoms = self.fw_iters + 1 if max_atoms is None else int(max_atoms)

    def _solve(self, W, D, budget, space, state):
        self._oracle_calls = 0
        if space is None:
            A = self.clip(D, budget)
        else:
            A, _ = _accelerated_dual_ascent(W, D, budget, space, state, self._project, self.max_iters, self.tol)
        return A, self._oracle_calls

    def clip(self, M, budget):
        return self._project(M, budget, self.tol)

    def _project(self, M, budget, accuracy):
        """``Π_ball(M)`` to relative ``accuracy`` by pairwise Frank–Wolfe from ``M·min(1, η/‖M‖₂)``.
        (Not warm-started from the previous dual step's atoms: those do not share the new ``M``'s
        singular vectors, the polytope structure is lost and the rate falls back to sublinear;
        measured slower.)"""
        # float64: at convergence the gradient's singular values on the interior of the box are
        # ~0, and float32 singular vectors there are noise that tilts the atoms out of M's basis
        # (measured: float32 stalled at 1.2e-4 from the clip, float64 reached 1.5e-11).
        dtype, M = M.dtype, M.double()
        A = rescale_into_ball(M, budget)
        atoms, weights = [A], [1.0]
        # below eps·‖M‖² the gap is round-off, and chasing it costs fw_iters
        target = max(accuracy**2, torch.finfo(M.dtype).eps) * float((M * M).sum())
        method = "svd" if self.clip_method == "svd" else "polar_express"
        for _ in range(self.fw_iters):
            grad = A - M
            S = -budget * msign(grad, 10, method)
            self._oracle_calls += 1
            if float((grad * (A - S)).sum()) <= target:
                break
            away = max(range(len(atoms)), key=lambda i: float((grad * atoms[i]).sum()))
            direction = S - atoms[away]
            gamma = min(weights[away], -float((grad * direction).sum())
                        / max(float((direction * direction).sum()), 1e-30))
            if gamma <= 0:
                break
            A = A + gamma * direction
            weights[away] -= gamma
            atoms.append(S)
            weights.append(gamma)
            if weights[away] <= 1e-12 * gamma:
                del atoms[away], weights[away]
            if len(atoms) > self.max_atoms:
                i, j = sorted(range(len(atoms)), key=weights.__getitem__)[:2]
                merged = weights[i] + weights[j]
                atoms[i] = (weights[i] * atoms[i] + weights[j] * atoms[j]) / merged
                weights[i] = merged
                del atoms[j], weights[j]
        return A.to(dtype)


class DualAscentSolver(InnerSolver):
    """Accelerated gradient ascent on the dual ``g(X) = min_{‖A‖₂≤η} ½‖A − Δ‖² + ⟨X, WᵀA⟩``:
    ``A(X) = clip(Δ − W X)``, ``∇g = sym(Wᵀ A(X))``, step ``1/‖W‖₂²``, Nesterov momentum with a
    gradient restart. Stops when the tangency residual of ``A(X)`` is below ``tol``."""

    name = "dual_ascent"

    def __init__(self, tangent: bool = False, tol: float = 1e-6, max_iters: int = 500,
                 clip_method: str = "svd"):
        # 500: accelerated dual ascent needs O(√κ) iterations for a W of condition number κ²;
        # on a 16×16 Gaussian W, 100 left the objective 6e-3 above ADMM's.
        super().__init__(tangent, tol, max_iters, clip_method)

    def _solve(self, W, D, budget, space, state):
        return _accelerated_dual_ascent(W, D, budget, space, state, lambda M, b, _: self.clip(M, b),
                                        self.max_iters, self.tol)


class QuasiNewtonDualSolver(InnerSolver):
    """The dual of :class:`DualAscentSolver`, maximised by ``torch.optim.LBFGS`` (strong-Wolfe
    line search, ``memory_size`` pairs); ``iterations`` counts dual evaluations."""

    name = "quasi_newton"

    def __init__(self, tangent: bool = False, tol: float = 1e-6, max_iters: int = 300,
                 clip_method: str = "svd", memory_size: int = 10):
        super().__init__(tangent, tol, max_iters, clip_method)
        if int(memory_size) != memory_size or memory_size < 1:
            raise ValueError(f"QuasiNewtonDualSolver: memory_size must be a positive integer, got {memory_size!r}")
        self.memory_size = int(memory_size)

    def _solve(self, W, D, budget, space, state):
        def negative_dual(X):
            X = sym(X)
            A = self.clip(D - W @ X, budget)
            value = 0.5 * ((A - D) ** 2).sum() + ((W @ X) * A).sum()
            return -value, -space.constraint(A)

        X0 = state.get("solver_dual")
        X0 = torch.zeros(W.shape[1], W.shape[1], dtype=D.dtype, device=D.device) if X0 is None else X0.to(D)
        grad_tol = self.tol * space.norm * float(torch.linalg.matrix_norm(D)) / W.shape[1]
        X, evaluations = minimize_lbfgs(negative_dual, X0, self.max_iters, grad_tol, self.memory_size)
        X = sym(X)
        state["solver_dual"] = X
        return self.clip(D - W @ X, budget), evaluations + 1


class ADMMSolver(InnerSolver):
    """ADMM on ``½‖A − Δ‖² + ι_T(A) + ι_B(Z)``, ``A = Z``:
    ``A ← P_T((Δ + ρ(Z − U))/(1 + ρ))``, ``Z ← clip(A + U)``, ``U ← U + A − Z``; ``ρ`` doubled or
    halved when the primal and dual residuals differ by more than 10× (``U`` rescaled with it).
    Stops when both relative residuals are below ``tol``."""

    name = "admm"

    def __init__(self, tangent: bool = False, tol: float = 1e-6, max_iters: int = 100,
                 clip_method: str = "svd", rho: float = 1.0, adaptive_rho: bool = True):
        super().__init__(tangent, tol, max_iters, clip_method)
        if not rho > 0:
            raise ValueError(f"ADMMSolver: rho must be positive, got {rho!r}")
        self.rho = float(rho)
        self.adaptive_rho = adaptive_rho

    def _solve(self, W, D, budget, space, state):
        Z = state.get("solver_z")
        Z = self.clip(space.project(D), budget) if Z is None or Z.shape != D.shape else Z.to(D)
        U = state.get("solver_u")
        U = torch.zeros_like(D) if U is None or U.shape != D.shape else U.to(D)
        rho = float(state.get("solver_rho", self.rho))
        scale = float(torch.linalg.matrix_norm(D)) + 1e-30
        for k in range(self.max_iters):
            A = space.project((D + rho * (Z - U)) / (1.0 + rho))
            Z_old, Z = Z, self.clip(A + U, budget)
            U = U + A - Z
            primal = float(torch.linalg.matrix_norm(A - Z)) / scale
            dual = rho * float(torch.linalg.matrix_norm(Z - Z_old)) / scale
            if primal < self.tol and dual < self.tol:
                break
            if self.adaptive_rho and primal > 10 * dual:
                rho, U = 2 * rho, U / 2
            elif self.adaptive_rho and dual > 10 * primal:
                rho, U = rho / 2, U * 2
        state.update(solver_z=Z, solver_u=U, solver_rho=rho)
        return A, k + 1


SOLVER_REGISTRY: dict[str, type[InnerSolver]] = {
    cls.name: cls
    for cls in (SpectralClipSolver, FrankWolfeSolver, DualAscentSolver, QuasiNewtonDualSolver, ADMMSolver)
}


def get_inner_solver(name: str, **kwargs) -> InnerSolver:
    """Build a solver by registry name (``"spectral_clip"``, ``"frank_wolfe"``, ``"dual_ascent"``,
    ``"quasi_newton"``, ``"admm"``) with constructor keyword arguments."""
    if name not in SOLVER_REGISTRY:
        raise ValueError(f"unknown inner solver {name!r}; choose one of {sorted(SOLVER_REGISTRY)}")
    return SOLVER_REGISTRY[name](**kwargs)
