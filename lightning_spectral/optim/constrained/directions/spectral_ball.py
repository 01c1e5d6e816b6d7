"""The direction on the spectral sphere ``‖W‖₂ = R`` or ball ``‖W‖₂ ≤ R``: ``Φ = msign(Ĝ + λΘ)``,
``Θ = u₁v₁ᵀ``, the scalar multiplier ``λ`` the root of the non-decreasing ``⟨Θ, Φ⟩``
(:func:`spectral_ball_direction`; Illinois root finding in :func:`_root`)."""

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
        mode: ``"inner"``: warm-started bracket, then the Illinois (safeguarded secant)
            method on ``h`` until ``|h| ≤ tol``; ``"amortized"``: ``λ ← λ − dual_lr·h(λ)``.
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
        def h_host(lam_: float) -> tuple[float, torch.Tensor]:
            value, Phi_ = h(lam_)
            return float(value), Phi_

        lam, h_val, Phi = _root(h_host, lam, constraint == "ball", tol, max_iters)
        info = DirectionInfo(iterations=evaluations, residual=torch.tensor(abs(h_val)))
        project = constraint == "sphere" or h_val < 0
    if project:
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
