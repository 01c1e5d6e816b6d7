"""The Birkhoff polytope of doubly stochastic matrices (``X ≥ 0``, ``X1 = 1``, ``Xᵀ1 = 1``) and
Sinkhorn balancing; its interior is the doubly stochastic multinomial manifold (Douik & Hassibi
2019, "Manifold optimization over the set of doubly stochastic matrices")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Geometry, record_inner


def _balance_residual(P: torch.Tensor) -> float:
    return max(float((P.sum(-1) - 1.0).abs().max()), float((P.sum(-2) - 1.0).abs().max()))


def _newton_balance(P: torch.Tensor) -> Optional[torch.Tensor]:
    """One damped Newton step on the convex scaling potential
    ``φ(u, v) = Σ P_ij e^{u_i + v_j} − Σu − Σv`` (its minimiser makes ``diag(e^u) P diag(e^v)``
    doubly stochastic), through the ``n × n`` Schur complement; ``None`` if it fails."""
    n = P.shape[-1]
    rows, cols = P.sum(-1), P.sum(-2)
    r, c = rows - 1.0, cols - 1.0
    schur = torch.diag(cols) - P.mT @ (P / rows[:, None]) + 1.0 / n  # + 11ᵀ/n fixes the null direction
    dv = torch.linalg.solve(schur, P.mT @ (r / rows) - c)
    du = -(r + P @ dv) / rows
    value = float(P.sum())
    for _ in range(20):
        Q = P * torch.exp(du)[:, None] * torch.exp(dv)[None, :]
        if bool(torch.isfinite(Q).all()) and float(Q.sum() - du.sum() - dv.sum()) <= value:
            return Q
        du, dv = 0.5 * du, 0.5 * dv
    return None


def sinkhorn(K: torch.Tensor, tol: float = 1e-6, max_iters: int = 200) -> tuple[torch.Tensor, int, float]:
    """Scale a positive square ``K`` to a doubly stochastic ``diag(a) K diag(b)`` in float64.

    Sinkhorn–Knopp sweeps (rows, then columns) converge at the rate ``σ₂²`` of the balanced
    matrix, hopelessly slowly near a permutation, which is where permutation learning goes;
    so after a few sweeps the solve switches to Newton's method on the scaling potential
    (quadratic convergence, one ``n × n`` solve per step), and back to sweeps if a Newton step
    fails. Ends with a column normalisation (column sums exact), stops when the row sums are
    within ``tol`` of 1 or after ``max_iters`` sweeps plus Newton steps. Returns
    ``(W, iterations, residual)``."""
    P = K.double().clamp_min(1e-300)
    iterations, failed = 0, False
    while iterations < max_iters:
        iterations += 1
        Q = _newton_balance(P) if iterations > 3 and not failed else None
        failed = Q is None and iterations > 3  # after a failed Newton step, one sweep, then retry
        P = Q if Q is not None else P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
        if _balance_residual(P) <= tol:
            break
    return P, iterations, _balance_residual(P)


@dataclass(frozen=True)
class Birkhoff(Geometry):
    """Doubly stochastic ``n × n`` matrices, ``n ≥ 2`` (the 1×1 polytope is the single point
    ``[[1]]``, where nothing would move). Tangent space of the interior:
    ``{A : A1 = 0, Aᵀ1 = 0}``, Euclidean projection ``(I − 11ᵀ/n) A (I − 11ᵀ/n)``.

    Retraction: the entropic (mirror) step ``Sinkhorn(X ⊙ exp(−step·D))``, entries floored at
    ``1e-12`` so the iterate stays in the interior (positive, so a balancing always exists; exact
    zeros could leave a pattern without total support). With ``D = −ξ ⊘ X`` it is Douik &
    Hassibi's retraction of the Fisher metric, under which it is a first-order Riemannian step.
    Non-negativity is exact, the column sums exact and the row sums within ``sinkhorn_tol``.

    Projection (at the start): ``Sinkhorn(exp(Z/init_temperature))``, ``Z`` the standardised
    matrix: not the Euclidean nearest point but a full-rank interior point that keeps the
    ordering of the entries (near a soft permutation for a small temperature). The uniform
    ``11ᵀ/n`` start would be the rank-1 averaging matrix.
    """

    sinkhorn_tol: float = 1e-6
    sinkhorn_max_iters: int = 100
    init_temperature: float = 0.5
    init_max_iters: int = 1000

    def unsupported_reason(self, shape):
        if shape[0] != shape[1]:
            return f"the Birkhoff polytope needs a square matrix, got {tuple(shape)}"
        if shape[0] == 1:
            return "the 1×1 Birkhoff polytope is the single point [[1]], so the matrix would never move"
        return None

    def tangent(self, X, A):
        A = A - A.mean(-1, keepdim=True)
        return A - A.mean(-2, keepdim=True)

    def retract(self, X, D, step, state=None):
        K = (X.double() * torch.exp(-step * D.double())).clamp_min(1e-12)
        W, iterations, residual = sinkhorn(K, self.sinkhorn_tol, self.sinkhorn_max_iters)
        if state is not None:
            record_inner(state, iterations, residual)
        return W.float()

    def project(self, X, state=None):
        Z = (X - X.mean()) / X.std().clamp_min(1e-30)
        W, iterations, residual = sinkhorn(torch.exp(Z.double() / self.init_temperature), self.sinkhorn_tol,
                                           self.init_max_iters)
        if state is not None:
            record_inner(state, iterations, residual)
        return W.float()

    def distance(self, X) -> float:
        """``max(max|row sum − 1|, max|column sum − 1|, max(−min X, 0))`` (float64 sums)."""
        X = X.double()
        return max(float((X.sum(1) - 1).abs().max()), float((X.sum(0) - 1).abs().max()),
                   float((-X).max().clamp_min(0)))
