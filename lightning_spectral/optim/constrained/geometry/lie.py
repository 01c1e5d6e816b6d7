"""Two matrix Lie groups: the special linear group ``SL(n)`` and the symplectic group ``Sp(2k)``.

A tangent vector at ``X`` is given by its Lie-algebra coordinates ``A`` (the move is ``X A``)
and the metric is left invariant, ``⟨XA, XB⟩ = tr(AᵀB)``: with ``f(X(I + tA)) ≈ f(X) +
t⟨XᵀG, A⟩`` the Riemannian gradient is the projection of ``XᵀG`` onto the Lie algebra.
Retractions map ``X(I − step·A)`` back into the group exactly (in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...linalg import sym
from .base import Geometry


@dataclass(frozen=True)
class SpecialLinear(Geometry):
    """``SL(n) = {X : det X = 1}``, square matrices. Lie algebra: trace-free matrices,
    projection ``P₀(A) = A − (tr A/n) I``. Retraction ``Y = X(I − step·A)``, rescaled to
    ``Y·(det Y)^{-1/n}`` (``slogdet`` in float64); ``det Y ≤ 0`` halves the step until it is
    positive, so ``X`` stays in the identity's component."""

    def unsupported_reason(self, shape):
        return None if shape[0] == shape[1] else f"SL(n) needs a square matrix, got {tuple(shape)}"

    def riemannian_gradient(self, X, G):
        return self.tangent(X, X.mT @ G)

    def tangent(self, X, A):
        return A - torch.eye(A.shape[-1], device=A.device, dtype=A.dtype) * torch.diagonal(A).mean()

    @staticmethod
    def _unit_det(Y: torch.Tensor, logabs: torch.Tensor) -> torch.Tensor:
        return (Y.double() * torch.exp(-logabs / Y.shape[-1])).float()

    def retract(self, X, D, step, state=None):
        W, WA = X.double(), X.double() @ D.double()
        for _ in range(40):
            Y = W - step * WA
            sign, logabs = torch.linalg.slogdet(Y)
            if sign > 0 and torch.isfinite(logabs):
                return self._unit_det(Y, logabs)
            step *= 0.5
        return X

    def project(self, X, state=None):
        """Flip the first row if ``det X < 0``, lift singular values below ``1e-3·σ₁`` (a
        singular matrix has no volume to rescale), rescale to ``det = 1``."""
        X = X.double()
        U, S, Vh = torch.linalg.svd(X)
        if float(S[0]) == 0.0:
            raise ValueError("it is the zero matrix, which has no volume to rescale to det W = 1; initialise it "
                             "with a nonzero matrix (e.g. nn.init.orthogonal_ or torch.eye)")
        if S[-1] < 1e-3 * S[0]:
            X = (U * S.clamp_min(1e-3 * S[0])) @ Vh
        sign, logabs = torch.linalg.slogdet(X)
        if sign < 0:
            X = X.clone()
            X[0] = -X[0]
        return self._unit_det(X, logabs)

    def distance(self, X) -> float:
        """``|det X − 1|`` (float64, of the float32 weights)."""
        sign, logabs = torch.linalg.slogdet(X.double())
        return abs(float(sign * torch.exp(logabs)) - 1.0)


def symplectic_form(n: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """``J = [[0, I], [−I, 0]]`` of size ``n`` (even)."""
    if n % 2:
        raise ValueError(f"the symplectic form needs an even size, got {n}")
    k = n // 2
    J = torch.zeros(n, n, device=device, dtype=dtype)
    eye = torch.eye(k, device=device, dtype=dtype)
    J[:k, k:] = eye
    J[k:, :k] = -eye
    return J


@dataclass(frozen=True)
class SymplecticGroup(Geometry):
    """``Sp(2k) = {X : XᵀJX = J}``, square matrices of even size. Tangent space at ``X``:
    ``{X J S : S symmetric}``; the coordinates are the symmetric ``S``, so the tangent projection
    is ``sym`` and the Riemannian gradient ``sym(JᵀXᵀG)`` (``f(X(I + tJS)) ≈ f(X) + t⟨sym(JᵀXᵀG), S⟩``).
    Retraction: the Cayley transform ``X (I + ½step·JS)⁻¹ (I − ½step·JS)`` (maps a Hamiltonian
    ``JS`` into ``Sp(2k)``), then one Newton step on ``XᵀJX = J`` against float32 drift."""

    def unsupported_reason(self, shape):
        if shape[0] != shape[1] or shape[0] % 2:
            return f"Sp(2k) needs a square matrix of even size, got {tuple(shape)}"
        return None

    def riemannian_gradient(self, X, G):
        J = symplectic_form(X.shape[-1], X.device, torch.float32)
        return sym(J.mT @ X.mT @ G)

    def tangent(self, X, A):
        return sym(A)

    def retract(self, X, D, step, state=None):
        n = X.shape[-1]
        J = symplectic_form(n, X.device)
        H = (0.5 * step) * (J @ D.double())
        eye = torch.eye(n, dtype=torch.float64, device=X.device)
        W = X.double() @ torch.linalg.solve(eye + H, eye - H)
        # One Newton step on WᵀJW = J, W ← W(I + ½JE), E = WᵀJW − J: removes the drift that
        # float32 storage of the previous iterates left (quadratically), so it cannot accumulate.
        return (W @ (eye + 0.5 * J @ (W.mT @ J @ W - J))).float()

    def project(self, X, state=None):
        """The nearest (Frobenius) orthogonal symplectic matrix: ``Sp ∩ O = U(k)`` embedded as
        ``[[A, −B], [B, A]]``, so the point is the unitary polar factor of the complex-linear part
        ``C = A + iB``, ``A = ½(X₁₁ + X₂₂)``, ``B = ½(X₂₁ − X₁₂)``. A rank-deficient ``C`` (the zero
        matrix included) gets the complex SVD's completion, still unitary."""
        k = X.shape[-1] // 2
        X = X.double()
        C = torch.complex(0.5 * (X[:k, :k] + X[k:, k:]), 0.5 * (X[k:, :k] - X[:k, k:]))
        U, _, Vh = torch.linalg.svd(C)
        Q = U @ Vh
        return torch.cat([torch.cat([Q.real, -Q.imag], 1), torch.cat([Q.imag, Q.real], 1)], 0).float()

    def distance(self, X) -> float:
        """``‖XᵀJX − J‖_F / (√n · max(1, ‖X‖₂²))`` (float64): the absolute error per row while
        ``‖X‖₂ ≤ 1``, relative to the scale of ``XᵀJX`` beyond (``Sp(2k)`` is not compact, and
        float32 storage alone leaves an error of about ``eps·‖X‖₂²``)."""
        n = X.shape[-1]
        J = symplectic_form(n, X.device)
        X = X.double()
        scale = max(1.0, float(torch.linalg.matrix_norm(X, ord=2)) ** 2)
        return float(torch.linalg.matrix_norm(X.mT @ J @ X - J)) / (math.sqrt(n) * scale)
