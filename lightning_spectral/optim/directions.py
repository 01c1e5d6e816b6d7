"""Steepest-descent directions under the spectral norm on a manifold, one matrix at a time.

Both solve ``max ⟨G, Φ⟩  s.t.  ‖Φ‖₂ ≤ 1,  Φ ∈ T`` (``T`` the tangent space) through the convex
dual, whose gradient is the constraint residual (seed 003, DESIGN §3):

- Stiefel (:func:`stiefel_direction`): ``Φ = msign(G + W X)``, ``X`` symmetric, minimising
  ``‖G + W X‖_*``; ``∇ = WᵀΦ + ΦᵀW``.
- Spectral sphere / ball (:func:`spectral_ball_direction`): ``Φ = msign(G + λΘ)``,
  ``Θ = u₁v₁ᵀ``, ``λ`` minimising ``‖G + λΘ‖_*``; ``∇ = ⟨Θ, Φ⟩``, monotone in ``λ``.

``mode="inner"`` iterates to a tolerance; ``mode="amortized"`` takes one dual step from the
multiplier kept by the caller (the optimizer's state) and returns the new one. ``G`` is divided
by an estimate of ``‖G‖₂`` first, so the multipliers live on a fixed scale whatever the
gradient's size (the dual step size is scale-dependent otherwise).

Weak duality is the certificate: for any feasible ``Φ``, ``⟨G, Φ⟩ ≤ ‖G + W X‖_*`` (resp.
``‖G + λΘ‖_*``). With ``certify=True`` the returned direction is made exactly feasible
(projected onto ``T``, rescaled into the unit ball) and the info carries both numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .linalg import TangentSpace, estimate_spectral_norm, minimize_lbfgs, orient, rescale_into_ball, sym
from .msign import msign, nuclear_norm


@dataclass
class DirectionInfo:
    """What a direction solve did: dual iterations (msign calls), the constraint residual of
    the msign iterate it stopped at, and, when certified, primal objective and dual value."""

    iterations: int
    residual: torch.Tensor
    objective: Optional[float] = None
    dual_value: Optional[float] = None

    @property
    def duality_gap(self) -> float:
        """``(dual − primal) / dual`` ≥ 0 up to round-off; needs ``certify=True``."""
        if self.objective is None or self.dual_value is None:
            raise ValueError("duality_gap needs a certified solve (certify=True)")
        return (self.dual_value - self.objective) / max(abs(self.dual_value), 1e-30)


def _check_mode(mode: str) -> None:
    if mode not in ("inner", "amortized"):
        raise ValueError(f"mode must be 'inner' or 'amortized', got {mode!r}")


def stiefel_direction(
    W: torch.Tensor,
    G: torch.Tensor,
    Y: Optional[torch.Tensor] = None,
    *,
    mode: str = "inner",
    alpha: float = 0.1,
    max_iters: int = 300,
    tol: float = 1e-5,
    msign_steps: int = 10,
    schedule: str = "polar_express",
    orthonormal: bool = True,
    certify: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, DirectionInfo]:
    """Manifold-Muon direction at ``W`` on the Stiefel manifold (DESIGN §3).

    Args:
        W: the point (``n × m``; a wide ``W`` is treated through its transpose, i.e. its rows
            are the orthonormal frame).
        G: the gradient (or momentum) at ``W``.
        Y: warm start, as a correction: the multiplier is ``X = X₀(Ĝ) + Y`` (symmetric,
            ``k × k``, ``k = min(n, m)``) with ``X₀ = −S`` the multiplier of the tangent
            projection, ``Ĝ + W X₀ = P_T(Ĝ)`` (exact for square ``W``). Keeping the correction
            rather than ``X`` itself makes the amortized mode track a gradient that changes
            direction from step to step. ``None``: ``Y = 0``.
        mode: ``"inner"`` (smoothed dual minimised by L-BFGS until the tangency residual is
            below ``tol``; the direction is tangent and in the unit ball) or ``"amortized"``
            (one dual step ``X ← X − α(WᵀΦ + ΦᵀW)``; the direction ``msign(Ĝ + WX)`` is then
            projected onto the tangent space, so it is tangent whatever the dual's progress,
            and ``info.residual`` is the tangency residual before that projection).
        alpha: amortized dual step on the normalised gradient, divided by ``‖W‖₂²``.
        orthonormal: ``W`` is on the manifold (skips the eigensolve of the general projection).
        certify: make ``Φ`` exactly feasible and report ``⟨G, Φ⟩`` and ``‖G + W X‖_*``.

    Returns:
        ``(Φ, Y, info)`` with ``Φ`` shaped like ``G`` and ``Y`` the correction to keep.
    """
    _check_mode(mode)
    flip, (Wt, Gt) = orient(W, G)
    space = TangentSpace(Wt, orthonormal=orthonormal)
    scale = estimate_spectral_norm(Gt).clamp_min(1e-30)
    Ghat = Gt / scale
    base = -space.multiplier(Ghat)
    X = base if Y is None else base + Y
    if mode == "amortized":
        w_sq = space.norm**2
        Phi = msign(Ghat + Wt @ X, msign_steps, schedule)
        C = space.constraint(Phi)  # the dual gradient is 2C; one product serves all three uses
        X_used, X = X, X - (alpha / max(w_sq, 1e-30)) * 2.0 * C
        k, residual = 0, space.residual(Phi, C)
        Phi = space.project(Phi, C)
    else:
        X, Phi, residual, k = _stiefel_inner(space, Ghat, X, max_iters, tol)
        X_used = X
    info = DirectionInfo(iterations=k + 1, residual=residual)
    if certify:
        Phi = rescale_into_ball(space.project(Phi), 1.0)
        info.objective = float((Gt * Phi).sum())
        info.dual_value = float(scale * nuclear_norm(Ghat + Wt @ X_used))
    return (Phi.mT if flip else Phi), X - base, info


SMOOTHING = (1e-2, 1e-3, 1e-4)


def _stiefel_inner(space, Ghat, X, max_iters, tol):
    """Minimise the dual ``‖Ĝ + W X‖_*`` in the ``k × k`` Gram space, smoothed.

    With ``M = Ĝ + W X`` and ``N = MᵀM = ĜᵀĜ + PᵀX + XP + X(WᵀW)X`` (``P = WᵀĜ``), each
    evaluation is one ``k × k`` eigensolve (float64) instead of an ``n × k`` msign. The nuclear
    norm is not smooth where ``M`` loses rank (there ``msign(M)`` is not the primal optimum and
    descent stalls), so L-BFGS minimises ``f_μ(X) = tr (N + μ²I)^{1/2}`` for ``μ`` in
    :data:`SMOOTHING` (continuation, warm-started), whose gradient is
    ``2 sym(Wᵀ Φ_μ)`` with ``Φ_μ = M (N + μ²I)^{-1/2}``. At a stationary point ``Φ_μ`` is exactly
    tangent and ``‖Φ_μ‖₂ < 1`` (feasible), and ``‖M‖_* − ⟨M, Φ_μ⟩ ≤ kμ/2``: the duality gap is
    set by the last ``μ`` (units of ``‖Ĝ‖₂ = 1``). Returns ``(X, Φ, residual, evaluations − 1)``."""
    W = space.W.double()
    G = Ghat.double()
    GtG, P, WtW = G.mT @ G, W.mT @ G, W.mT @ W
    eye = torch.eye(GtG.shape[0], dtype=GtG.dtype, device=GtG.device)

    def smoothed(X, mu):
        N = GtG + P.mT @ X + X @ P + X @ WtW @ X + (mu * mu) * eye
        lam, Q = torch.linalg.eigh(sym(N))
        lam = lam.clamp_min(mu * mu)
        return lam.sqrt().sum(), (Q * lam.rsqrt()) @ Q.mT

    grad_tol = tol * space.norm
    evaluations = 0
    X = X.double()
    for mu in SMOOTHING:
        def value_and_grad(X_, mu=mu):
            X_ = sym(X_)
            value, inv_sqrt = smoothed(X_, mu)
            return value, 2.0 * sym((P + WtW @ X_) @ inv_sqrt)

        budget = max(1, (max_iters - evaluations) // (len(SMOOTHING) - SMOOTHING.index(mu)))
        X, used = minimize_lbfgs(value_and_grad, X, budget, max(grad_tol, 0.1 * mu * space.norm)
                                 if mu != SMOOTHING[-1] else grad_tol)
        X = sym(X)
        evaluations += used
    Phi = ((G + W @ X) @ smoothed(X, SMOOTHING[-1])[1]).to(Ghat.dtype)
    return X.to(Ghat.dtype), Phi, space.residual(Phi), evaluations - 1


def spectral_ball_direction(
    G: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    lam: float = 0.0,
    *,
    constraint: str = "sphere",
    mode: str = "inner",
    dual_lr: float = 0.1,
    max_iters: int = 50,
    tol: float = 1e-4,
    msign_steps: int = 10,
    schedule: str = "polar_express",
    certify: bool = False,
) -> tuple[torch.Tensor, float, DirectionInfo]:
    """Steepest direction on the spectral sphere ``‖W‖₂ = R`` (or ball ``≤ R``) at a ``W``
    whose top singular pair is ``(u, v)`` (DESIGN §3).

    The sphere's tangent space is ``{A : uᵀAv = 0}``; on the ball's boundary the tangent cone is
    ``{A : uᵀAv ≥ 0}`` (a step ``W − lr·Φ`` must not raise ``σ₁``), whose multiplier is
    ``λ ≥ 0``. ``h(λ) = ⟨Θ, msign(Ĝ + λΘ)⟩`` is non-decreasing from −1 to 1.

    Args:
        G: gradient (or momentum) at ``W``.
        u, v: unit top left/right singular vectors of ``W``.
        lam: warm-start multiplier (in units of the normalised gradient).
        constraint: ``"sphere"``, ``"ball"`` (``W`` on the boundary) or ``"none"`` (``W``
            strictly inside the ball: plain ``msign(G)``).
        mode: ``"inner"``: warm-started bracket, then the Illinois (safeguarded secant)
            method on ``h`` until ``|h| ≤ tol``; ``"amortized"``: ``λ ← λ − dual_lr·h(λ)``.
        certify: make ``Φ`` exactly feasible and report ``⟨G, Φ⟩`` and ``‖G + λΘ‖_*``.

    Returns:
        ``(Φ, λ, info)``.
    """
    _check_mode(mode)
    if constraint not in ("sphere", "ball", "none"):
        raise ValueError(f"constraint must be 'sphere', 'ball' or 'none', got {constraint!r}")
    scale = estimate_spectral_norm(G).clamp_min(1e-30)
    Ghat = G / scale
    Theta = torch.outer(u, v)
    evaluations = 0

    def h(lam_: float) -> tuple[float, torch.Tensor]:
        nonlocal evaluations
        evaluations += 1
        Phi_ = msign(Ghat + lam_ * Theta, msign_steps, schedule)
        return float(u @ Phi_ @ v), Phi_

    if constraint == "none":
        lam, (h_val, Phi) = 0.0, h(0.0)
    elif mode == "amortized":
        lam = max(lam, 0.0) if constraint == "ball" else lam
        h_val, Phi = h(lam)
        lam = lam - dual_lr * h_val
        lam = max(lam, 0.0) if constraint == "ball" else lam
    else:
        lam, h_val, Phi = _root(h, lam, constraint == "ball", tol, max_iters)
    info = DirectionInfo(iterations=evaluations, residual=torch.tensor(abs(h_val)))
    if constraint != "none" and (constraint == "sphere" or h_val < 0) and (certify or mode == "inner"):
        Phi = Phi - (u @ Phi @ v) * Theta
    if certify:
        Phi = rescale_into_ball(Phi, 1.0)
        info.objective = float((G * Phi).sum())
        info.dual_value = float(scale * nuclear_norm(Ghat + lam * Theta))
    return Phi, lam, info


def _root(h, lam: float, nonnegative: bool, tol: float, max_iters: int):
    """Root of the non-decreasing ``h`` near ``lam``: expand a bracket geometrically from the
    warm start, then Illinois steps (secant, halving the value at an end kept twice), which keep
    the bracket and converge superlinearly; stops at ``|h| ≤ tol`` or a bracket of width
    ``≤ 1e-9`` (``h`` jumps where ``Θ`` is a singular pair of ``G``). With ``nonnegative`` the
    answer is ``max(root, 0)``."""
    if nonnegative:
        lam = max(lam, 0.0)
        h0, Phi0 = h(0.0)
        if h0 >= 0.0:
            return 0.0, h0, Phi0
    fb, Phi_b = h(lam)
    b, width = lam, 0.05
    direction = 1.0 if fb < 0 else -1.0
    while abs(fb) > tol:
        a, fa = b, fb
        b = a + direction * width
        fb, Phi_b = h(b)
        if (fb > 0) != (fa > 0) or width > 1e6:
            break
        width *= 2.0
    for _ in range(max_iters):
        if abs(fb) <= tol or abs(b - a) <= 1e-9 * (1.0 + abs(b)) or fa == fb:
            break
        c = (a * fb - b * fa) / (fb - fa)
        fc, Phi_c = h(c)
        if (fc > 0) == (fb > 0):
            fa *= 0.5
        else:
            a, fa = b, fb
        b, fb, Phi_b = c, fc, Phi_c
    return b, fb, Phi_b
