"""The direction on the spectral sphere ``‖W‖₂ = R`` or ball ``‖W‖₂ ≤ R``: ``Φ = msign(Ĝ + λΘ)``,
``Θ = u₁v₁ᵀ``, the scalar multiplier ``λ`` the root of the non-decreasing ``⟨Θ, Φ⟩``
(:func:`spectral_ball_direction`; the inner mode's root by safeguarded Newton on the exact
polar factor in the Gram space, :class:`_GramPolar` and :func:`_root`)."""

from __future__ import annotations

from typing import Optional

import torch

from ...base import check_mode
from ...linalg import estimate_spectral_norm, matvec, per_matrix, rescale_into_ball
from ...msign import msign, nuclear_norm
from .common import DirectionInfo


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
    boundary: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, float, DirectionInfo]:
    """Steepest direction on the spectral sphere ``‖W‖₂ = R`` (or ball ``≤ R``) at a ``W``
    whose top singular pair is ``(u, v)``.

    The sphere's tangent space is ``{A : uᵀAv = 0}``; on the ball's boundary the tangent cone is
    ``{A : uᵀAv ≥ 0}`` (a step ``W − lr·Φ`` must not raise ``σ₁``), whose multiplier is
    ``λ ≥ 0``. ``h(λ) = ⟨Θ, msign(Ĝ + λΘ)⟩`` is non-decreasing from −1 to 1.

    Args:
        G: gradient (or momentum) at ``W``; in the amortized mode also a stack ``B × m × n``
            (with ``u``, ``v`` and ``lam`` stacked alike), each matrix treated as if alone.
        u, v: unit top left/right singular vectors of ``W``.
        lam: warm-start multiplier (in units of the normalised gradient); a float, or a tensor
            (then the amortized mode reads nothing back to the host and returns a tensor).
        constraint: ``"sphere"``, ``"ball"`` (``W`` on the boundary) or ``"none"`` (``W``
            strictly inside the ball: plain ``msign(G)``).
        mode: ``"inner"``: safeguarded Newton on ``h`` from the warm start until ``|h| ≤ tol``,
            ``h`` and ``h'`` of the exact polar factor from one Gram matrix (:class:`_GramPolar`:
            an ``m × m`` eigensolve per evaluation, ``msign_steps``/``schedule`` unused);
            ``"amortized"``: ``λ ← λ − dual_lr·h(λ)`` with Newton–Schulz ``msign``.
        certify: make ``Φ`` exactly feasible and report ``⟨G, Φ⟩`` and ``‖G + λΘ‖_*``.
        boundary: ``constraint="ball"`` only: a boolean per matrix, ``False`` where ``W`` is
            strictly inside the ball (treated as ``"none"`` there); ``None``: all on the boundary.

    Returns:
        ``(Φ, λ, info)``.
    """
    check_mode(mode)
    if constraint not in ("sphere", "ball", "none"):
        raise ValueError(f"constraint must be 'sphere', 'ball' or 'none', got {constraint!r}")
    stack = G.ndim > 2
    if stack and (mode == "inner" or certify):
        raise ValueError("spectral_ball_direction: a stack of matrices takes mode='amortized' without certify; "
                         "solve the inner mode (or certify) one matrix at a time")
    if boundary is not None and constraint != "ball":
        raise ValueError("spectral_ball_direction: boundary= is for constraint='ball'")
    scale = per_matrix(estimate_spectral_norm(G).clamp_min(1e-30))
    Ghat = G / scale
    Theta = u[..., :, None] * v[..., None, :]
    evaluations = 0

    def h(lam_):
        """``(⟨Θ, msign(Ĝ + λΘ)⟩, msign(Ĝ + λΘ))``, per matrix (``lam_`` a float or a tensor)."""
        nonlocal evaluations
        evaluations += 1
        if isinstance(lam_, torch.Tensor):
            lam_ = per_matrix(lam_)
        Phi_ = msign(Ghat + lam_ * Theta, msign_steps, schedule)
        return (u * matvec(Phi_, v)).sum(-1), Phi_

    if mode == "amortized" or constraint == "none":
        # On the device throughout (a stack, or a tensor lam, is never read back): a matrix
        # strictly inside the ball has λ = 0, and Ĝ + 0·Θ = Ĝ exactly.
        lam_t = torch.as_tensor(lam, dtype=G.dtype, device=G.device)
        inside = None if boundary is None else ~boundary
        if constraint == "none":
            lam_t = torch.zeros_like(lam_t)
        elif constraint == "ball":
            lam_t = lam_t.clamp_min(0.0)
        if inside is not None:
            lam_t = torch.where(inside, 0.0, lam_t)
        h_t, Phi = h(lam_t)
        if constraint != "none":
            lam_t = lam_t - dual_lr * h_t
            lam_t = lam_t.clamp_min(0.0) if constraint == "ball" else lam_t
            if inside is not None:
                lam_t = torch.where(inside, 0.0, lam_t)
        info = DirectionInfo(iterations=evaluations, residual=h_t.abs())
        lam = lam_t if stack or isinstance(lam, torch.Tensor) else float(lam_t)
        project = certify and constraint != "none" and (constraint == "sphere" or float(h_t) < 0)
    else:
        polar = _GramPolar(Ghat, u, v)
        lam, h_val, token = _root(polar, float(lam), constraint == "ball", tol, max_iters)
        Phi = polar.direction(token)
        info = DirectionInfo(iterations=polar.evaluations, residual=torch.tensor(abs(h_val)))
        project = constraint == "sphere" or h_val < 0
    if project:
        Phi = Phi - (u @ Phi @ v) * Theta
    if certify:
        Phi = rescale_into_ball(Phi, 1.0)
        info.objective = float((G * Phi).sum())
        info.dual_value = float(scale * nuclear_norm(Ghat + lam * Theta))
    return Phi, lam, info


class _GramPolar:
    """``h(λ) = ⟨Θ, msign(M)⟩``, ``M = Ĝ + λuvᵀ``, and ``h'(λ)``, from one Gram matrix.

    For ``M`` tall (else its transpose), ``msign(M) = M N^{-1/2}`` with ``N = MᵀM =
    ĜᵀĜ + λ(cvᵀ + vcᵀ) + λ²‖u‖²vvᵀ`` (``c = Ĝᵀu``): a rank-two change of ``ĜᵀĜ``, formed once (one
    float64 GEMM). Each evaluation is the float64 ``eigh`` of the ``m × m`` ``N = QΛQᵀ`` and
    ``h = pᵀΛ^{-1/2}q`` (``p = QᵀMᵀu``, ``q = Qᵀv``); no ``n × m`` work. Eigenvalues below
    ``m·ε₆₄·λ_max`` count as the null space (``msign`` is 0 there, as Newton–Schulz makes it).
    The derivative, by the Daleckii–Krein formula (Higham, *Functions of Matrices*, 2008, Thm 3.11)
    for ``f(x) = x^{-1/2}``, whose divided differences are
    ``f[a, b] = −1/(√a√b(√a + √b))``: ``dN/dλ = c'vᵀ + vc'ᵀ`` (``c' = Mᵀu``), so
    ``h' = ‖u‖²qᵀΛ^{-1/2}q + Σᵢⱼ pᵢ(pᵢqⱼ + qᵢpⱼ) f[λᵢ, λⱼ] qⱼ``, ``O(m²)``. The direction is formed once
    at the end: ``M·QΛ^{-1/2}Qᵀ``, one GEMM. This is the exact polar factor, which the
    Newton–Schulz chains approximate."""

    def __init__(self, Ghat: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        self.flip = Ghat.shape[-2] < Ghat.shape[-1]
        M0, a, b = (Ghat.mT, v, u) if self.flip else (Ghat, u, v)
        self.M0, self.a, self.b, self.dtype = M0, a, b, Ghat.dtype
        M0d = M0.double()
        self.A0 = M0d.mT @ M0d
        self.c, self.bd = M0d.mT @ a.double(), b.double()
        self.aa = float(a.double() @ a.double())  # ‖u‖² = 1 to the input's round-off, kept exact here
        self.evaluations = 0

    def __call__(self, lam: float, derivative: bool = True):
        """``(h(λ), h'(λ) or None, token)``; ``token`` forms the direction (:meth:`direction`)."""
        self.evaluations += 1
        c, b = self.c + (lam * self.aa) * self.bd, self.bd  # c = Mᵀu
        N = self.A0 + lam * (torch.outer(self.c, b) + torch.outer(b, self.c)) + (lam * lam * self.aa) * torch.outer(b, b)
        evals, Q = torch.linalg.eigh(N)
        live = evals > evals[-1].clamp_min(1e-300) * (N.shape[-1] * torch.finfo(torch.float64).eps)
        root = torch.where(live, evals.clamp_min(1e-300).sqrt(), torch.zeros_like(evals))
        inv = torch.where(live, 1.0 / root.clamp_min(1e-300), torch.zeros_like(evals))
        p, q = Q.mT @ c, Q.mT @ b
        value = float((p * inv * q).sum())
        slope = None
        if derivative:
            # f[λᵢ, λⱼ] = −1/(√λᵢ√λⱼ(√λᵢ + √λⱼ)) on the live eigenvalues
            dd = -(inv[:, None] * inv[None, :]) / (root[:, None] + root[None, :]).clamp_min(1e-300)
            dd = torch.where(live[:, None] & live[None, :], dd, torch.zeros_like(dd))
            E = torch.outer(p, q) + torch.outer(q, p)
            slope = float(self.aa * (q * inv * q).sum() + (p[:, None] * (E * dd) * q[None, :]).sum())
        return value, slope, (lam, Q, inv)

    def direction(self, token) -> torch.Tensor:
        lam, Q, inv = token
        R = ((Q * inv) @ Q.mT).to(self.dtype)           # N^{-1/2}
        Phi = self.M0 @ R + lam * torch.outer(self.a, R @ self.b)
        return Phi.mT if self.flip else Phi


def _root(h, lam: float, nonnegative: bool, tol: float, max_iters: int):
    """Root of the non-decreasing ``h`` near the warm start ``lam`` (``h(λ) → (value, slope,
    token)``): safeguarded Newton (the Newton step where it stays inside the bracket known so
    far, else bisection, or a doubling step while no sign change is bracketed; Press et al.,
    *Numerical Recipes*, §9.4 ``rtsafe``), stopping at ``|h| ≤ tol`` or a bracket of width
    ``≤ 1e-9`` (``h`` jumps where ``Θ`` is a singular pair of ``G``). With ``nonnegative`` the
    answer is ``max(root, 0)``. Returns ``(λ, h(λ), token)``."""
    lo, hi = -float("inf"), float("inf")  # h(lo) < 0 < h(hi)
    if nonnegative:
        lam = max(lam, 0.0)
        if lam > 0.0:
            value, slope, token = h(lam)
            if abs(value) <= tol:
                return lam, value, token
            if value > 0:  # the root is below λ: is it below 0?
                hi = lam
                value, slope, token = h(0.0)
                lam = 0.0
        else:
            value, slope, token = h(0.0)
        if lam == 0.0:
            if value >= 0.0:
                return 0.0, value, token
            lo = 0.0
    else:
        value, slope, token = h(lam)
    width = 0.05
    for _ in range(max_iters):
        if abs(value) <= tol:
            break
        if value < 0:
            lo = max(lo, lam)
        else:
            hi = min(hi, lam)
        if hi - lo <= 1e-9 * (1.0 + abs(lam)):
            break
        step = -value / slope if slope is not None and slope > 0 else None
        if step is not None and lo < lam + step < hi:
            nxt = lam + step
        elif lo > -float("inf") and hi < float("inf"):
            nxt = 0.5 * (lo + hi)
        else:  # no bracket yet and no usable Newton step: expand
            nxt = lam + (width if value < 0 else -width)
            width *= 2.0
        lam = nxt
        value, slope, token = h(lam)
    return lam, value, token
