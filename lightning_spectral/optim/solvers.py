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
- :class:`DualAscentSolver`: Nesterov-accelerated ascent (with restart) on the symmetric
  multiplier ``X`` of the tangency constraint; for a given ``X`` the primal answer is
  ``clip(Δ − W X)``; the step is preconditioned by the tangency operator (:class:`TangentDual`),
  and the iteration runs in the ``m × m`` Gram space.
- :class:`QuasiNewtonDualSolver`: the same dual, maximised with ``torch.optim.LBFGS``.
- :class:`ADMMSolver`: splits the tangent space (``A``) from the ball (``Z``), scaled dual ``U``,
  penalty ``ρ = 1`` (residual balancing optional), iterated in the same Gram space.

Stopping: ``tol`` is the relative objective gap of the returned step, ``P(A) ≤ (1 + tol)·P*``
(``P(A) = ½‖A − Δ‖²``), certified by a dual value (:class:`TangentDual`): the dual solvers
evaluate it at every iterate, ADMM the dual of its own splitting at its ball multiplier, Frank–Wolfe (without
tangency) by its own gap. Default 1e-3. Every returned step is feasible to round-off (tangent,
and in the ball after the rescale). Warm starts (the multiplier ``X``, ADMM's ``U, ρ``) are
tensors in the ``state`` dict the caller passes (the optimizer's ``self.state[p]``, keys
prefixed ``solver_``), so they are checkpointed with the optimizer (``weights_only`` loads).
After each call ``solver.last_info`` holds iterations, residuals, the certified gap, and
``closed_form``: whether the step came from a formula with no iteration (the exact clip without
tangency, or the rescale of :class:`SpectralClipSolver`), so a log can tell "dual ascent" that
never iterated from one that did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .linalg import (
    TangentSpace,
    as_matrix,
    estimate_spectral_norm,
    orient,
    rescale_into_ball,
    spectral_clip,
    spectral_norm,
)
from .msign import msign


@dataclass
class SolveInfo:
    """``iterations``: inner iterations (clip or msign evaluations); ``tangent_residual``:
    scale-free ``‖sym(WᵀA)‖_F/(‖W‖₂‖A‖_F)`` of the returned step (0 without tangency);
    ``norm_excess``: ``max(0, ‖A‖₂/η − 1)`` of the returned step (0 up to round-off: every
    solver ends with the rescale into the ball); ``closed_form``: the step is a formula, no
    iteration ran (``iterations == 0``); ``gap``: the certified relative objective gap
    ``(P(A) − g)/g ≥ (P(A) − P*)/P*`` of the returned step (:class:`TangentDual`; 0 for an exact
    formula, ``None`` where nothing certifies it: :class:`SpectralClipSolver`)."""

    iterations: int
    tangent_residual: float
    norm_excess: float
    closed_form: bool = False
    gap: Optional[float] = None


class InnerSolver:
    """Base class: orientation, validation, feasibility restoration and bookkeeping.

    Args:
        tangent: also keep the step in ``{A : WᵀA + AᵀW = 0}`` (the Stiefel tangent space at
            ``W``; for any ``W``, the moves that leave ``WᵀW`` unchanged to first order).
        tol: the relative objective gap at which the iteration stops: the returned step ``A``
            satisfies ``P(A) ≤ (1 + tol)·P*`` (``P(A) = ½‖A − Δ‖²``, certified by a dual value,
            :class:`TangentDual`), hence ``‖A − A*‖_F ≤ √(2·tol·P*)``. Default 1e-3: a step within
            ``√(2e-3) ≈ 4.5 %`` of ``‖A* − Δ‖`` of the exact one, far inside what a stochastic
            gradient's noise moves it.
        max_iters: iteration cap (``last_info.gap`` then says how far it got).
        clip_method: the projection onto the spectral ball, used by the closed-form clip without
            tangency and Frank–Wolfe's oracle: ``"svd"`` (default: exact, and
            reads nothing back to the host), ``"gram"`` (the short side's Gram eigenpairs: float32
            SVD accuracy at a fraction of its cost on a CPU, one host read per call to choose the
            Gram's precision; :func:`~lightning_spectral.optim.linalg.spectral_clip`) or
            ``"msign"`` (SVD-free by two Polar-Express msign calls; accurate to about 1e-3). With
            tangency the dual solvers and ADMM clip in the Gram space whatever this says
            (:class:`TangentDual`: exact eigenpairs of ``MᵀM``).
    """

    name = "base"

    def __init__(self, tangent: bool = False, tol: float = 1e-3, max_iters: int = 100,
                 clip_method: str = "svd"):
        if not tol > 0 or not math.isfinite(tol):
            raise ValueError(f"{type(self).__name__}: tol must be a positive number, got {tol!r}")
        if int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"{type(self).__name__}: max_iters must be a positive integer, got {max_iters!r}")
        if clip_method not in ("gram", "svd", "msign"):
            raise ValueError(f"{type(self).__name__}: clip_method must be 'gram', 'svd' or 'msign', "
                             f"got {clip_method!r}")
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
        residual = norm = None
        if space is None and self.exact_without_tangent:
            A, iterations, gap = self.clip(Dt, spectral_budget), 0, 0.0
            if self.clip_method != "msign":
                norm = 0.0  # an exact clip: its singular values are min(σ, η) by construction
        else:
            A, iterations, gap, residual, norm = self._solve(Wt, Dt, float(spectral_budget), space, state)
        if space is not None and residual is None:
            A = space.project(A)
        if norm is None:
            norm = float(spectral_norm(A, "gram"))
            if norm > spectral_budget:
                A = A * (spectral_budget / norm)
        self.last_info = SolveInfo(
            iterations=iterations,
            tangent_residual=(residual if residual is not None else float(space.residual(A))) if space is not None else 0.0,
            norm_excess=max(0.0, min(norm, spectral_budget) / spectral_budget - 1.0),
            closed_form=iterations == 0,
            gap=gap,
        )
        return (A.mT if flip else A).reshape(delta.shape).to(delta.dtype)

    exact_without_tangent = True

    def clip(self, M: torch.Tensor, budget: float) -> torch.Tensor:
        return spectral_clip(M, budget, self.clip_method)

    def _solve(self, W, D, budget, space, state):
        """``(A, iterations, certified relative gap or None, tangency residual, ‖A‖₂)``; the last
        two ``None`` when not known, and then ``A`` is projected and rescaled here."""
        raise NotImplementedError


class SpectralClipSolver(InnerSolver):
    """``Δ · min(1, η/‖Δ‖₂)`` after the tangent projection: the cheap, inexact baseline."""

    name = "spectral_clip"
    exact_without_tangent = False

    def _solve(self, W, D, budget, space, state):
        return (space.project(D) if space is not None else D), 0, None, None, None


def _objective(A: torch.Tensor, D: torch.Tensor) -> float:
    """``½‖A − Δ‖_F²``, summed in float64."""
    return 0.5 * float(((A - D).double() ** 2).sum())


# The Gram-space dual runs in float32 while ε₃₂ times the error amplification of the clipped
# singular values stays below this (TangentDual).
GRAM_SPREAD_LIMIT = 1e-4


@dataclass
class DualPoint:
    """One evaluation of :class:`TangentDual` at ``X``: the dual gradient ``grad = sym(WᵀA(X))``,
    its preconditioned form ``S`` (``P_T(A) = A − W S``), the dual value ``lower = g(X)``, the
    objective ``upper`` of the feasible step ``F = scale·P_T(A(X))`` (``certified``: computed with
    the exact ``‖P_T(A)‖₂``, else an optimistic estimate), and ``F``'s tangency residual (of the
    exact ``F``; forming it adds the working dtype's round-off) and spectral norm; ``K`` (Gram-space evaluation: ``A(X) = (Δ − W X) K``) or ``A`` (explicit)."""

    X: torch.Tensor
    grad: torch.Tensor
    S: torch.Tensor
    lower: float
    upper: float
    scale: float
    residual: float
    norm: float
    certified: bool
    K: Optional[torch.Tensor] = None
    A: Optional[torch.Tensor] = None


class TangentDual:
    """The Lagrangian dual of the tangency constraint at one problem ``(W, Δ, η)`` (tall, ``n × m``),
    and the certificate it gives every solver here.

    ``g(X) = min_{‖A‖₂≤η} ½‖A − Δ‖² + ⟨X, WᵀA⟩`` (``X`` symmetric) is concave, and by weak
    duality ``g(X) ≤ P*`` for every ``X``; the minimiser is ``A(X) = clip(Δ − W X)`` and
    ``∇g(X) = sym(WᵀA(X))``. A feasible step from it: ``T = P_T(A) = A − W S`` (``S`` the
    :class:`~lightning_spectral.optim.linalg.TangentSpace` multiplier) rescaled,
    ``F = T·min(1, η/‖T‖₂)``, has ``P(F) ≥ P*``. Hence the relative gap ``(P(F) − g(X))/g(X)``
    bounds ``(P(F) − P*)/P*`` and, ``P`` being 1-strongly convex, ``½‖F − A*‖² ≤ P(F) − P*``
    (Boyd & Vandenberghe, *Convex Optimization*, §5.5).

    ``S`` is also the ascent step: ``−∇²g ≼ L``, ``L(H) = ½(CH + HC)``, ``C = WᵀW``, and
    ``S = L⁻¹∇g``; where the clip is inactive the dual is the quadratic with Hessian ``−L`` and
    ``X + S`` is its maximiser (the preconditioned Uzawa iteration with the exact Schur
    complement: Bramble, Pasciak & Vassilev, SIAM J. Numer. Anal. 34, 1997), so no step size
    ``1/‖W‖₂²`` that an ill-conditioned ``W`` makes tiny.

    Everything but the answer lives in the ``m × m`` Gram space, in the eigenbasis ``Q`` of
    ``C = QΛQᵀ`` (where ``C`` is diagonal and ``L⁻¹`` divides entry ``(i, j)`` by
    ``(λᵢ + λⱼ)/2``): with ``M = Δ − W X``, ``MᵀM = ΔᵀΔ − XB − BᵀX + XCX`` (``B = WᵀΔ``) has the
    eigenpairs ``(σᵢ², vᵢ)``, the clip is ``A = M K``, ``K = I − Σ_{σᵢ>η} (1 − η/σᵢ) vᵢvᵢᵀ``,
    and ``WᵀA = (B − CX) K``, ``⟨A, Δ⟩ = ⟨K, MᵀΔ⟩``, ``‖A‖² = Σ min(σᵢ², η²)``,
    ``TᵀT = AᵀA − 2 sym(AᵀW S) + SCS``: an evaluation is seven ``m × m`` products and an
    ``eigh``, no ``n × m`` GEMM; three GEMMs set the problem up (``C``, ``ΔᵀΔ``, ``B``) and two
    form the answer ``F = scale·(ΔK − W(XK + S))``. ``‖T‖₂`` (an ``eigvalsh``) is computed only
    when a few power steps on ``TᵀT`` (a lower bound) say the gap may be met. The Gram matrices
    square ``Δ``'s conditioning: the ``m × m`` work runs in float32 while ``ε₃₂·s ≤``
    :data:`GRAM_SPREAD_LIMIT`, ``s = (‖Δ‖₂ + ‖W‖₂‖X₀‖_F)²/η²`` (the error amplification of the
    singular values at the clip; ``X₀`` the warm start), else in float64.

    With ``project_ball(M, target) → (A, slack)``, an inexact ball projection whose objective is
    at most ``slack`` above the exact minimum (which lowers the dual value), it works on the
    ``n × m`` matrices instead, in the original basis.
    """

    def __init__(self, W: torch.Tensor, D: torch.Tensor, budget: float, space: TangentSpace, X0: torch.Tensor,
                 project_ball=None):
        self.W, self.D, self.budget, self.space, self.project_ball = W, D, budget, space, project_ball
        self.total = float((D.double() ** 2).sum())  # ‖Δ‖_F²
        self.work = D.dtype
        self.eps = torch.finfo(D.dtype).eps
        if project_ball is not None:
            return
        gram = D.mT @ D
        if self.work == torch.float32:
            top = float(estimate_spectral_norm(gram.double()))  # ≈ ‖Δ‖₂² (a power estimate, doubled below)
            spread = (math.sqrt(2.0 * top) + space.norm * float(X0.double().norm())) ** 2 / budget**2
            if self.eps * spread > GRAM_SPREAD_LIMIT:
                self.work, gram = torch.float64, D.double().mT @ D.double()
                self.eps = torch.finfo(torch.float64).eps
        work = self.work
        self.Q = space.eigenvectors.to(work)
        self.lam = space.eigenvalues.to(work)                       # C = Q diag(λ) Qᵀ
        self.metric = (self.lam[:, None] + self.lam[None, :]) / 2   # L in the basis Q
        self.metric_inverse = (2.0 * space.inverse_denominators).to(work)
        self.DtD = self.to_basis(gram.to(work))
        self.B = self.to_basis(W.to(work).mT @ D.to(work))
        self.eye = torch.eye(D.shape[1], dtype=work, device=D.device)
        self._probe = None  # the power iteration's vector for ‖T‖₂, kept across evaluations

    def to_basis(self, X: torch.Tensor) -> torch.Tensor:
        """``QᵀXQ``: a symmetric ``m × m`` matrix in the coordinates the solver iterates in."""
        if self.project_ball is not None:
            return X.to(self.D.dtype)
        return self.Q.mT @ X.to(self.work) @ self.Q

    def from_basis(self, X: torch.Tensor) -> torch.Tensor:
        if self.project_ball is not None:
            return X
        return (self.Q @ X @ self.Q.mT).to(self.D.dtype)

    def evaluate(self, X: torch.Tensor, best_lower: float = -math.inf, tol: float = 0.0) -> DualPoint:
        """The dual at ``X`` (basis coordinates). The feasible step's objective ``upper`` is
        computed exactly (an ``eigvalsh``) only if a power estimate of ``‖T‖₂`` says the gap
        ``tol`` over ``max(best_lower, g(X))`` may be met; otherwise ``upper`` is that
        estimate's (a lower bound of the true ``P(F)``) and ``certified`` is false."""
        if self.project_ball is not None:
            return self._evaluate_explicit(X, best_lower, tol)
        eta, B, lam = self.budget, self.B, self.lam
        XB, XC = X @ B, X * lam
        MtD = self.DtD - XB
        G = MtD - XB.mT + XC @ X                                   # MᵀM
        sig2, V = torch.linalg.eigh(0.5 * (G + G.mT))
        sig2 = sig2.clamp_min(0.0)
        shrink = (1.0 - eta / sig2.sqrt().clamp_min(1e-300)).clamp_min(0.0)
        K = self.eye - (V * shrink) @ V.mT
        WtA = (B - XC.mT) @ K                                      # Wᵀ M K
        grad = 0.5 * (WtA + WtA.mT)
        kept = sig2.clamp(max=eta**2)
        AD = float((K.double() * MtD.double()).sum())
        lower = 0.5 * (float(kept.double().sum()) - 2.0 * AD + self.total) + float((X.double() * grad.double()).sum())
        S = grad * self.metric_inverse
        WtAS = WtA.mT @ S
        TtT = (V * kept) @ V.mT - WtAS - WtAS.mT + (S * lam) @ S
        TD = AD - float((S.double() * B.double()).sum())
        TT = float(torch.diagonal(TtT).double().sum())

        def objective(norm_T: float) -> tuple[float, float]:
            scale = min(1.0, eta / norm_T) if norm_T > 0 else 1.0
            return scale, 0.5 * (scale * scale * TT - 2.0 * scale * TD + self.total)

        v = V[:, -1] if self._probe is None else self._probe
        for _ in range(3):
            v = TtT @ v
            v = v / v.norm().clamp_min(1e-300)
        self._probe = v
        scale, upper = objective(float((v @ (TtT @ v)).clamp_min(0.0).sqrt()))
        certified = upper - max(best_lower, lower) <= tol * max(best_lower, lower)
        if certified:
            norm_T = float(torch.linalg.eigvalsh(0.5 * (TtT + TtT.mT))[-1].clamp_min(0.0).sqrt())
            scale, upper = objective(norm_T)
        else:
            norm_T = math.inf
        CS = S * lam[:, None]
        residual = float((grad - 0.5 * (CS + CS.mT)).norm()) / (self.space.norm * math.sqrt(max(TT, 0.0)) + 1e-30)
        return DualPoint(X, grad, S, lower, upper, scale, residual, scale * norm_T, certified, K=K)

    def _evaluate_explicit(self, X, best_lower, tol) -> DualPoint:
        W, D, space = self.W, self.D, self.space
        target = 0.25 * tol * (best_lower if best_lower > 0 else 0.5 * self.total)
        A, slack = self.project_ball(torch.addmm(D, W, X, alpha=-1.0), target)
        grad = space.constraint(A)
        lower = _objective(A, D) + float((X.double() * grad.double()).sum()) - slack
        S = space.multiplier(A, grad)
        T = torch.addmm(A, W, S, alpha=-1.0)
        norm_T = float(spectral_norm(T, "gram"))
        scale = min(1.0, self.budget / norm_T) if norm_T > 0 else 1.0
        return DualPoint(X, grad, S, lower, _objective(scale * T, D), scale, float(space.residual(T)),
                         scale * norm_T, True, A=scale * T)

    def step(self, point: DualPoint) -> torch.Tensor:
        """The feasible step ``F`` of an evaluation, ``n × m``."""
        if point.A is not None:
            return point.A
        K, P = self.from_basis(point.K), self.from_basis(point.X @ point.K + point.S)
        return point.scale * torch.addmm(self.D @ K, self.W, P, alpha=-1.0)

    def floor(self, X: torch.Tensor) -> float:
        """What round-off can move ``P − g`` by, ``4ε(‖Δ‖² + ‖W‖₂‖X‖_F‖Δ‖_F)`` (measured in float32:
        about ``2ε‖Δ‖²``); a ``tol`` below it relative to ``P*`` stops there."""
        return 4 * self.eps * (self.total + self.space.norm * float(X.double().norm()) * math.sqrt(self.total))


class Certificate:
    """The best certified feasible step and the best dual value seen so far, and their gap."""

    def __init__(self, problem: TangentDual, tol: float):
        self.problem, self.tol = problem, tol
        self.lower, self.dual = -math.inf, None
        self.best: Optional[DualPoint] = None
        self.own: Optional[tuple[torch.Tensor, float]] = None  # a solver's own feasible step and objective

    @property
    def upper(self) -> float:
        return min(self.best.upper if self.best is not None else math.inf,
                   self.own[1] if self.own is not None else math.inf)

    def evaluate(self, X: torch.Tensor) -> DualPoint:
        point = self.problem.evaluate(X, self.lower, self.tol)
        self.add(point)
        return point

    def add(self, point: DualPoint, own: Optional[tuple[torch.Tensor, float]] = None) -> None:
        if point.lower > self.lower:
            self.lower, self.dual = point.lower, point.X
        if point.certified and (self.best is None or point.upper < self.best.upper):
            self.best = point
        if own is not None and (self.own is None or own[1] < self.own[1]):
            self.own = own
        self.last = point

    def met(self) -> bool:
        slack = self.upper - self.lower
        return slack <= self.tol * max(self.lower, 0.0) or slack <= self.problem.floor(self.dual)

    def result(self) -> tuple[torch.Tensor, float, Optional[float], Optional[float]]:
        """``(step, relative gap, tangency residual, spectral norm)`` of the best feasible step
        (``None`` where the caller must compute them); the gap is ``max(P − g, 0)/g`` (``inf``
        while no dual value is positive)."""
        if self.best is None and self.own is None:  # the cap came first: certify the last point
            point = self.last
            self.problem._probe = None
            self.best = self.problem.evaluate(point.X, math.inf, math.inf)
        gap = max(self.upper - self.lower, 0.0) / self.lower if self.lower > 0 else math.inf
        if self.own is not None and (self.best is None or self.own[1] < self.best.upper):
            return self.own[0], gap, None, None
        return self.problem.step(self.best), gap, self.best.residual, self.best.norm


def _accelerated_dual_ascent(cert: Certificate, X: torch.Tensor, max_iters: int) -> int:
    """Nesterov-accelerated ascent on ``g`` in the metric ``L`` (step ``X ← Y + S(Y)``, see
    :class:`TangentDual`) with the gradient restart of O'Donoghue & Candès (2015), from the warm
    start ``X`` (basis coordinates), until ``cert`` is met. Returns the iterations."""
    Y, t = X, 1.0
    for k in range(max_iters):
        point = cert.evaluate(Y)
        if cert.met():
            break
        X_next = Y + point.S
        if float((point.grad * (X_next - X)).sum()) < 0:  # restart: momentum points downhill
            t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Y = X_next + ((t - 1.0) / t_next) * (X_next - X)
        X, t = X_next, t_next
    return k + 1


def _warm_dual(state: dict, D: torch.Tensor) -> torch.Tensor:
    X = state.get("solver_dual")
    m = D.shape[1]
    if X is None or tuple(X.shape) != (m, m):
        return D.new_zeros(m, m)
    return X.to(D)


class FrankWolfeSolver(InnerSolver):
    """Projection-free: the ball projection ``Π_ball(M) = argmin_{‖A‖₂≤η} ½‖A − M‖²`` by pairwise
    (away-step) conditional gradient, with the spectral-ball linear oracle ``S = −η·msign(A − M)``.

    The iterate is a convex combination of feasible atoms (started from ``M·min(1, η/‖M‖₂)``);
    each step moves weight from the *away* atom ``V = argmaxᵢ ⟨A − M, Vᵢ⟩`` to ``S`` along
    ``S − V`` with exact line search, capped by ``V``'s weight. Plain Frank–Wolfe zig-zags
    towards the face of the solution and converges as O(1/k) (measured: 1e-2 from the SVD clip
    after 100 iterations); the pairwise step converges linearly here, because every atom and
    iterate shares ``M``'s singular vectors, so the ball acts as the box ``[−η, η]^r`` on the
    singular values, a polytope. The Frank–Wolfe gap ``⟨A − M, A − S⟩`` bounds the objective
    error, so ``P(A) − gap`` is a lower bound and the projection stops at the relative objective
    gap ``tol`` (without tangency) or at the absolute target the dual loop asks for. Measured
    from ``η = 0.3‖M‖₂`` on 12 Gaussian cases (distance to the clip): 1e-3 … 2e-2 after 10
    steps, 3e-11 … 7e-5 after 40, round-off after 160. Known slow case: a singular value of
    ``M`` within ~1e-3 of ``η`` (the box is then nearly degenerate and the iteration sensitive to
    round-off): 3.6e-4 after 160 steps on one such 24×16 case.

    With tangency the linear oracle over ball ∩ tangent space has no closed form (it is the
    manifold-Muon problem), and an approximate one stalls the gap; instead the tangency
    constraint is dualised exactly as in :class:`DualAscentSolver` and each dual step's ball
    projection is this Frank–Wolfe, its gap lowering the certified dual value.

    ``iterations`` counts linear-oracle calls (one msign each: exact by SVD, or Polar Express with
    ``clip_method="msign"``). ``max_iters`` caps the dual steps, ``fw_iters`` the Frank–Wolfe
    steps per projection. Memory: up to ``max_atoms`` (default ``fw_iters + 1``) float64
    matrices of ``Δ``'s size during a projection, none kept after it. Below that cap the two
    lightest atoms are merged into their weighted mean, a feasible point, so the combination
    stays exact; but merged atoms are no longer vertices and the rate suffers (measured on
    48×32: 64 atoms 1e-5 in 160 steps, 16 atoms 4e-4 in 1000).
    """

    name = "frank_wolfe"
    exact_without_tangent = False

    def __init__(self, tangent: bool = False, tol: float = 1e-3, max_iters: int = 500,
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
            A, fw_gap = self._project(D, budget, relative=self.tol)
            value = _objective(A, D)
            floor = 16 * torch.finfo(D.dtype).eps * float((D.double() ** 2).sum())
            lower = value - fw_gap
            gap = 0.0 if fw_gap <= floor else (fw_gap / lower if lower > 0 else math.inf)
            return A, self._oracle_calls, gap, None, None
        X = _warm_dual(state, D)
        problem = TangentDual(W, D, budget, space, X, lambda M, target: self._project(M, budget, absolute=target))
        cert = Certificate(problem, self.tol)
        _accelerated_dual_ascent(cert, problem.to_basis(X), self.max_iters)
        state["solver_dual"] = problem.from_basis(cert.dual)
        step, gap, residual, norm = cert.result()
        return step, self._oracle_calls, gap, residual, norm

    def _project(self, M, budget, relative: float = 0.0, absolute: float = 0.0):
        """``(Π_ball(M), Frank–Wolfe gap)`` by pairwise Frank–Wolfe from ``M·min(1, η/‖M‖₂)``,
        stopped when the gap is at most ``absolute`` or ``relative·(½‖A − M‖² − gap)``.
        (Not warm-started from the previous dual step's atoms: those do not share the new ``M``'s
        singular vectors, the polytope structure is lost and the rate falls back to sublinear;
        measured slower.)"""
        # float64: at convergence the gradient's singular values on the interior of the box are
        # ~0, and float32 singular vectors there are noise that tilts the atoms out of M's basis
        # (measured: float32 stalled at 1.2e-4 from the clip, float64 reached 1.5e-11).
        dtype, M = M.dtype, M.double()
        A = rescale_into_ball(M, budget)
        atoms, weights = [A], [1.0]
        floor = torch.finfo(M.dtype).eps * float((M * M).sum())  # below it the gap is round-off
        method = "polar_express" if self.clip_method == "msign" else "svd"
        fw_gap = math.inf
        for _ in range(self.fw_iters):
            grad = A - M
            S = -budget * msign(grad, 10, method)
            self._oracle_calls += 1
            fw_gap = float((grad * (A - S)).sum())
            value = 0.5 * float((grad * grad).sum())
            if fw_gap <= max(absolute, relative * (value - fw_gap), floor):
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
        return A.to(dtype), max(fw_gap, 0.0)


class DualAscentSolver(InnerSolver):
    """Accelerated ascent on the dual ``g(X) = min_{‖A‖₂≤η} ½‖A − Δ‖² + ⟨X, WᵀA⟩`` of the tangency
    constraint (:class:`TangentDual`): ``A(X) = clip(Δ − W X)``, preconditioned step
    ``X ← Y + L⁻¹ sym(WᵀA(Y))``, Nesterov momentum with a gradient restart, warm-started from the
    last call's multiplier (``state["solver_dual"]``); stops at the certified relative objective
    gap ``tol``."""

    name = "dual_ascent"

    def __init__(self, tangent: bool = False, tol: float = 1e-3, max_iters: int = 100,
                 clip_method: str = "svd"):
        super().__init__(tangent, tol, max_iters, clip_method)

    def _solve(self, W, D, budget, space, state):
        X = _warm_dual(state, D)
        problem = TangentDual(W, D, budget, space, X)
        cert = Certificate(problem, self.tol)
        iterations = _accelerated_dual_ascent(cert, problem.to_basis(X), self.max_iters)
        state["solver_dual"] = problem.from_basis(cert.dual)
        step, gap, residual, norm = cert.result()
        return step, iterations, gap, residual, norm


class QuasiNewtonDualSolver(InnerSolver):
    """The dual of :class:`DualAscentSolver`, maximised by ``torch.optim.LBFGS`` (strong-Wolfe
    line search, ``memory_size`` pairs) in the coordinates ``Z = L^{1/2} X`` where the
    preconditioned step is the gradient step (:class:`TangentDual`); ``iterations`` counts dual
    evaluations. Warm-started from ``state["solver_dual"]``; stops at the certified relative
    objective gap ``tol`` (checked at the warm start and after every L-BFGS iteration)."""

    name = "quasi_newton"

    def __init__(self, tangent: bool = False, tol: float = 1e-3, max_iters: int = 100,
                 clip_method: str = "svd", memory_size: int = 10):
        super().__init__(tangent, tol, max_iters, clip_method)
        if int(memory_size) != memory_size or memory_size < 1:
            raise ValueError(f"QuasiNewtonDualSolver: memory_size must be a positive integer, got {memory_size!r}")
        self.memory_size = int(memory_size)

    def _solve(self, W, D, budget, space, state):
        X0 = _warm_dual(state, D)
        problem = TangentDual(W, D, budget, space, X0)
        cert = Certificate(problem, self.tol)
        root, root_inverse = problem.metric.sqrt(), problem.metric_inverse.sqrt()  # Z = L^{1/2} X
        Z0 = problem.to_basis(X0) * root
        point = cert.evaluate(Z0 * root_inverse)
        evaluations = 1
        if not cert.met():
            # torch's L-BFGS takes min(1, 1/‖∇‖₁) as its first step; in Y = sZ, s = 1/‖∇_Z‖₁, that
            # first step is the unit step in Z (the preconditioned Uzawa step of TangentDual)
            # instead of a short one its line search must expand. Later steps are invariant to s.
            grad_Z = -point.grad * root_inverse  # ∇_Z = L^{-1/2} ∇_X (of −g)
            norm1 = float(grad_Z.abs().sum())
            s = 1.0 / norm1 if norm1 > 1.0 else 1.0
            Y = (Z0 * s).clone()
            last = {"Y": Y.clone(), "value": torch.tensor(-point.lower, dtype=Y.dtype), "grad": grad_Z / s}

            @torch.no_grad()
            def closure():  # LBFGS calls it under enable_grad; the weights need no graph
                nonlocal evaluations
                Yd = Y.detach()
                if not torch.equal(last["Y"], Yd):  # LBFGS re-evaluates its start
                    evaluations += 1
                    point = cert.evaluate(Yd * (root_inverse / s))
                    last.update(Y=Yd.clone(), value=torch.tensor(-point.lower, dtype=Y.dtype),
                                grad=-point.grad * (root_inverse / s))
                Y.grad = last["grad"].clone()
                return last["value"]

            lbfgs = torch.optim.LBFGS([Y], lr=1.0, max_iter=1, max_eval=self.max_iters, tolerance_grad=0.0,
                                      tolerance_change=0.0, history_size=self.memory_size, line_search_fn="strong_wolfe")
            while evaluations < self.max_iters:
                lbfgs.step(closure)
                if cert.met():
                    break
        state["solver_dual"] = problem.from_basis(cert.dual)
        step, gap, residual, norm = cert.result()
        return step, evaluations, gap, residual, norm


class ADMMSolver(InnerSolver):
    """ADMM on ``½‖A − Δ‖² + ι_T(A) + ι_B(Z)``, ``A = Z`` (scaled dual ``U``; Boyd et al.,
    *Distributed Optimization and Statistical Learning via ADMM*, 2011, §3.1.1):
    ``A ← P_T(V)``, ``V = (Δ + ρ(Z − U))/(1 + ρ)``, ``Z ← clip(A + U)``, ``U ← U + A − Z``.

    Every iterate is ``Δ·x₁ + W·x₂`` for two ``m × m`` coefficient matrices (the projection adds
    ``W S``, the clip multiplies on the right), so the iteration runs in the Gram space of
    :class:`TangentDual` (in ``C``'s eigenbasis, from ``ΔᵀΔ``, ``WᵀΔ``, ``WᵀW`` formed once): an
    iteration is the ``eigh`` of an ``m × m`` ``MᵀM`` and ten ``m × m`` products, no ``n × m``
    GEMM or SVD; the norms it needs come from that ``eigh``'s eigenvalues (``clip(M) = MK``,
    ``‖M − clip(M)‖² = Σ(σᵢ − η)₊²``). Two ``n × m`` GEMMs form the answer.

    Certificate: for any ball multiplier ``Y`` (here ``ρU``) the dual of the split problem is
    ``h(Y) = ½‖Δ‖² − ½‖P_T(Δ − Y)‖² − η‖Y‖_*`` (the tangency multiplier maximised out;
    ``‖ρU‖_* = ρ Σ (σᵢ − η)₊`` from the clip), and ``h(Y) ≤ P*``. The feasible step: ``P_T(Δ − ρU)`` (the ``A``
    of ADMM's fixed point for this ``U``), rescaled into the ball by its exact ``‖·‖₂`` (an
    ``eigvalsh``, computed only when a power estimate says the gap ``tol`` may be met). The
    returned step's objective is recomputed from the step itself.

    ``ρ``: fixed at ``rho`` by default; ``f = ½‖A − Δ‖² + ι_T`` is 1-strongly convex and 1-smooth
    on ``T``, for which ``ρ = √(μL) = 1`` is the optimal fixed penalty (Giselsson & Boyd, IEEE TAC
    62, 2017); ``adaptive_rho=True`` balances the residuals (Boyd et al. §3.4.1: ``ρ`` doubled or
    halved when the primal and dual residuals differ by more than 10×; measured: more
    iterations on ResNet-18's gradients). ``iterations`` counts clips. Warm start: ``Z, U`` as
    coefficient matrices (original basis) and ``ρ`` (``state["solver_admm"]``,
    ``state["solver_rho"]``): the next call reads them against its own ``Δ, W``."""

    name = "admm"

    def __init__(self, tangent: bool = False, tol: float = 1e-3, max_iters: int = 100,
                 clip_method: str = "svd", rho: float = 1.0, adaptive_rho: bool = False):
        super().__init__(tangent, tol, max_iters, clip_method)
        if not rho > 0 or not math.isfinite(rho):
            raise ValueError(f"ADMMSolver: rho must be a positive number, got {rho!r}")
        self.rho = float(rho)
        self.adaptive_rho = adaptive_rho

    def _solve(self, W, D, budget, space, state):
        m = D.shape[1]
        problem = TangentDual(W, D, budget, space, D.new_zeros(m, m))
        G = _GramPairs(problem)
        I, eta, total, tol = problem.eye, budget, problem.total, self.tol
        warm = state.get("solver_admm")
        rho = float(state.get("solver_rho", self.rho))
        for key in ("solver_z", "solver_u"):  # the n × m warm start of earlier versions
            state.pop(key, None)
        zero = torch.zeros_like(I)
        if warm is not None and tuple(warm.shape) == (2, m, m):
            # U from the last call; Z = P_T(Δ − ρU), ADMM's fixed point for that U
            u1, u2 = (problem.to_basis(x) for x in warm.to(D))
            z1, z2 = I - rho * u1, -rho * u2
            z2 = z2 - G.multiplier(z1, z2)
        else:  # Z = Δ, U = 0
            z1, z2, u1, u2, rho = I, zero, zero, zero, self.rho
        lower, upper, best, X, candidate = -math.inf, math.inf, None, None, None
        for k in range(self.max_iters):
            c = 1.0 / (1.0 + rho)
            v1, v2 = c * (I + rho * (z1 - u1)), c * rho * (z2 - u2)
            a1, a2 = v1, v2 - G.multiplier(v1, v2)
            m1, m2 = a1 + u1, a2 + u2
            sig, K = G.clip(m1, m2, eta)
            zo1, zo2 = z1, z2
            z1, z2 = m1 @ K, m2 @ K
            u1, u2 = m1 - z1, m2 - z2
            over = (sig - eta).clamp_min(0.0).double()
            # the dual value at Y = ρU (‖U‖² = Σ(σᵢ − η)₊²), and the tangent step P_T(Δ − ρU)
            y1, y2 = I - rho * u1, -rho * u2
            X = G.multiplier(y1, y2)
            eu = G.with_delta(u1, u2)
            yy = total - 2.0 * rho * eu + rho * rho * float((over * over).sum()) - G.metric_norm2(X)
            lower = max(lower, 0.5 * (total - yy) - eta * rho * float(over.sum()))
            candidate = (y1, y2 - X, yy, total - rho * eu - float((X * G.B).double().sum()))
            upper, best = G.offer(candidate, lower, upper, best, tol)
            if upper - lower <= max(tol * lower, problem.floor(X)):
                break
            if self.adaptive_rho:
                primal = G.norm2(a1 - z1, a2 - z2) ** 0.5
                dual = rho * G.norm2(z1 - zo1, z2 - zo2) ** 0.5
                if primal > 10 * dual or dual > 10 * primal:
                    f = 2.0 if primal > dual else 0.5
                    rho, u1, u2 = rho * f, u1 / f, u2 / f
        state["solver_admm"] = torch.stack([problem.from_basis(u1), problem.from_basis(u2)])
        state["solver_rho"] = rho
        if best is None:  # the cap came first: the last candidate, rescaled by its exact norm
            upper, best = G.offer(candidate, lower, math.inf, None, tol, force=True)
        scale, b1, b2, norm = best
        F = scale * torch.addmm(D @ problem.from_basis(b1), W, problem.from_basis(b2))
        value = _objective(F, D)
        gap = max(value - lower, 0.0) / lower if lower > 0 else math.inf
        residual = G.tangency_residual(b1, b2)
        return F, k + 1, gap, residual, scale * norm


class _GramPairs:
    """``n × m`` matrices ``Δ·x₁ + W·x₂`` as coefficient pairs, in the eigenbasis of ``WᵀW``
    (:class:`TangentDual`'s ``ΔᵀΔ``, ``B = WᵀΔ``, ``λ``): inner products, Gram matrices, the
    tangent projection's multiplier and the clip, all ``m × m``."""

    def __init__(self, problem: TangentDual):
        self.problem, self.DtD, self.B, self.lam = problem, problem.DtD, problem.B, problem.lam
        self.lamc, self.metric_inverse = problem.lam[:, None], problem.metric_inverse
        self._probe = None  # the power iteration's vector, kept across candidates

    def with_delta(self, x1, x2) -> float:
        """``⟨Δx₁ + Wx₂, Δ⟩``."""
        return float((x1 * self.DtD).double().sum() + (x2 * self.B).double().sum())

    def norm2(self, x1, x2) -> float:
        return max(float((x1 * (self.DtD @ x1)).double().sum() + 2.0 * ((self.B @ x1) * x2).double().sum()
                         + (x2 * x2 * self.lamc).double().sum()), 0.0)

    def metric_norm2(self, S) -> float:
        """``‖W S‖² = tr(SΛS)``."""
        return float((S * S * self.lamc).double().sum())

    def gram(self, x1, x2):
        t = x1.mT @ (self.B.mT @ x2)
        g = x1.mT @ (self.DtD @ x1) + t + t.mT + x2.mT @ (x2 * self.lamc)
        return 0.5 * (g + g.mT)

    def _gram_times(self, x1, x2, v):
        p, q = x1 @ v, x2 @ v
        return x1.mT @ (self.DtD @ p + self.B.mT @ q) + x2.mT @ (self.B @ p + self.lam * q)

    def constraint(self, x1, x2):
        """``sym(Wᵀ(Δx₁ + Wx₂))``."""
        g = self.B @ x1 + self.lamc * x2
        return 0.5 * (g + g.mT)

    def multiplier(self, x1, x2):
        """``S`` with ``P_T(Δx₁ + Wx₂) = Δx₁ + W(x₂ − S)``."""
        return self.constraint(x1, x2) * self.metric_inverse

    def tangency_residual(self, x1, x2) -> float:
        return float(self.constraint(x1, x2).norm()) / (self.problem.space.norm * math.sqrt(self.norm2(x1, x2)) + 1e-30)

    def clip(self, x1, x2, eta):
        """``(σ, K)``: the singular values of ``M = Δx₁ + Wx₂`` and ``K`` with ``clip(M) = M K``."""
        sig2, V = torch.linalg.eigh(self.gram(x1, x2))
        sig = sig2.clamp_min(0.0).sqrt()
        shrink = (1.0 - eta / sig.clamp_min(1e-300)).clamp_min(0.0)
        return sig, self.problem.eye - (V * shrink) @ V.mT

    def offer(self, candidate, lower, upper, best, tol, force=False):
        """A tangent candidate ``(x₁, x₂, ‖·‖², ⟨·, Δ⟩)``: its objective after the rescale into
        the ball, by a power estimate of its norm first (a lower bound, so an optimistic
        objective) and the exact ``eigvalsh`` only if that may meet ``tol``. Returns the best
        certified ``(upper, (scale, x₁, x₂, norm))`` (``force``: the exact norm whatever the estimate)."""
        x1, x2, xx, xd = candidate
        total = self.problem.total

        def objective(norm):
            scale = min(1.0, self.problem.budget / norm) if norm > 0 else 1.0
            return scale, 0.5 * (scale * scale * xx - 2.0 * scale * xd + total)

        if not force:
            if 0.5 * (xx - 2.0 * xd + total) - lower > tol * lower:  # already too far before the rescale
                return upper, best
            v = torch.ones_like(self.lam) if self._probe is None else self._probe
            for _ in range(3):
                v = self._gram_times(x1, x2, v)
                v = v / v.norm().clamp_min(1e-300)
            self._probe = v
            if objective(float((v @ self._gram_times(x1, x2, v)).clamp_min(0.0).sqrt()))[1] - lower > tol * lower:
                return upper, best
        norm = float(torch.linalg.eigvalsh(self.gram(x1, x2))[-1].clamp_min(0.0).sqrt())
        scale, value = objective(norm)
        if value < upper:
            return value, (scale, x1, x2, norm)
        return upper, best


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
