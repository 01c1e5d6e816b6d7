"""The spectral sphere ``‖X‖₂ = R`` and ball ``‖X‖₂ ≤ R``.

``σ₁`` is differentiable where the top singular value is simple, with ``dσ₁ = u₁ᵀ dX v₁``, so
the sphere's tangent space at ``X`` is ``{A : u₁ᵀAv₁ = 0}`` (Bernstein 2025, "Modular manifolds";
the ball's tangent cone on its boundary is ``{A : u₁ᵀAv₁ ≤ 0}`` for a move ``X + A``). Both are
retracted by scaling, which is also the Frobenius-nearest point along the ray: ``X ← (R/σ₁) X``
(sphere) or ``X ← min(1, R/σ₁) X`` (ball).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...linalg import matvec, per_matrix, top_singular_pair, top_singular_triple, track_top_singular
from .base import Geometry

RADIUS_MODES = ("spectral_mup", "identity")


@dataclass(frozen=True)
class SpectralSphere(Geometry):
    """The sphere ``‖X‖₂ = R`` (``ball=False``) or the ball ``‖X‖₂ ≤ R``.

    Radius: ``radius_mode="spectral_mup"`` ``R = radius_scale·√(out/in)`` on the matrix's own
    ``out × in`` shape (Yang, Simon & Bernstein 2023, "A spectral condition for feature
    learning"), ``"identity"`` ``R = radius_scale``. The retraction tracks the top pair kept in
    ``state`` as ``u``, ``v``: ``tracking_steps`` Golub–Kahan–Lanczos steps from the last pair
    in float32, without a host sync
    (:func:`~lightning_spectral.optim.linalg.track_top_singular`; the value is a lower bound,
    exact once ``tracking_steps ≥ min(m, n)``; measured after SpectralBall's steps on a GPT's
    freshly initialised weights, whose clustered tops a step reorders: 32 steps within 5e-5 of
    the SVD's ``σ₁``, mostly within 1e-7; and the Krylov search goes on from the improved pair
    at the next step). Without a
    warm start ``σ₁`` is found to ``sigma_tol`` (relative) by Lanczos on the Gram matrix
    (:func:`~lightning_spectral.optim.linalg.top_singular_triple`; an SVD costs more than a whole
    msign on ResNet-18's shapes, power iteration stalls on a clustered top).
    """

    batched = True

    radius_mode: str = "spectral_mup"
    radius_scale: float = 1.0
    ball: bool = False
    sigma_tol: float = 1e-6
    tracking_steps: int = 32

    def radius(self, shape: torch.Size) -> float:
        if self.radius_mode == "identity":
            return self.radius_scale
        return self.radius_scale * math.sqrt(shape[0] / math.prod(shape[1:]))

    def scale(self, X: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``X`` scaled onto the set, given its ``σ₁`` (a stack of matrices: ``σ₁`` of each)."""
        factor = per_matrix(self.radius(X.shape[-2:]) / sigma)
        return X * (factor.clamp(max=1.0) if self.ball else factor)

    def project(self, X, state=None):
        sigma = top_singular_pair(X)[0]
        if float(sigma) == 0.0 and not self.ball:
            raise ValueError("it is the zero matrix, which no scaling puts on the sphere ‖W‖₂ = R; initialise "
                             "it with a nonzero matrix (e.g. nn.init.orthogonal_) or use constraint='ball'")
        return self.scale(X, sigma)

    def tangent(self, X, A):
        """``A − (u₁ᵀAv₁) u₁v₁ᵀ`` (ball: only on the boundary and only the outward part)."""
        sigma, u, v = top_singular_pair(X)
        along = (u * matvec(A, v)).sum(-1)
        P = A - along[..., None, None] * (u[..., :, None] * v[..., None, :])
        if not self.ball:
            return P
        keep = (sigma < self.radius(X.shape[-2:]) * (1.0 - 1e-6)) | (along <= 0)
        return torch.where(keep[..., None, None], A, P)

    def retract(self, X, D, step, state=None):
        Y = X - step * D
        if state is not None and "u" in state:
            sigma, u, v, _ = track_top_singular(Y, state["u"], state["v"], self.tracking_steps)
        else:
            sigma, u, v, _ = top_singular_triple(Y, None, self.sigma_tol)
        if state is not None:
            state.update(u=u, v=v)
        return self.scale(Y, sigma)

    def distance(self, X) -> float:
        """``σ₁/R − 1`` with the exact ``σ₁``, signed: ``< 0`` inside the sphere (on the set for the ball)."""
        return float(torch.linalg.matrix_norm(X, ord=2)) / self.radius(X.shape) - 1.0

    def contains(self, X, tol) -> bool:
        d = self.distance(X)
        return d <= tol if self.ball else abs(d) <= tol
