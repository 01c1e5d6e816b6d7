"""The Stiefel manifold and the two sets built on it: blocks of a matrix each on its own Stiefel
manifold, and the Grassmann manifold of subspaces represented by orthonormal bases.

A tall ``n × k`` point has orthonormal columns (``XᵀX = I``), a wide one orthonormal rows, a
square one is orthogonal; every method works in tall orientation internally and is batched over
leading dimensions (blocks). Absil, Mahony & Sepulchre 2008, "Optimization Algorithms on Matrix
Manifolds", §3.5–3.6 and §4.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...linalg import orient, sym
from ...msign import polar_retraction
from .base import Geometry


@dataclass(frozen=True)
class Stiefel(Geometry):
    """``{X : XᵀX = I}`` (tall orientation). Tangent space ``{A : XᵀA + AᵀX = 0}``, projection
    ``A − X sym(XᵀA)``; retraction: the polar factor of ``X − step·D`` to ``retraction_tol``
    (for tangent ``D`` its singular values lie in ``[1, √(1 + step²‖D‖₂²)]``, so
    :func:`~lightning_spectral.optim.msign.polar_retraction` needs one or two fixed-point steps).
    ``direction_norm``: a bound on ``‖D‖₂`` that the binding's direction guarantees; the steps
    are then counted from ``max |σ² − 1| ≤ (step·direction_norm)² + 4·retraction_tol·(1 + step)``
    (the start's own deviation and the tangency round-off it causes included) without reading
    ``‖XᵀX − I‖`` back to the host; ``None``: read back (one host sync per retraction)."""

    batched = True

    retraction_tol: float = 1e-6
    direction_norm: Optional[float] = None

    def project(self, X, state=None):
        """The polar factor ``U Vᵀ`` of ``X = UΣVᵀ``, the Frobenius-nearest point; a rank-deficient
        ``X`` (the zero matrix included) gets the SVD's completion, still orthonormal."""
        U, _, Vh = torch.linalg.svd(X, full_matrices=False)
        return U @ Vh

    def tangent(self, X, A):
        flip, (Xt, At) = orient(X, A)
        P = At - Xt @ sym(Xt.mT @ At)
        return P.mT if flip else P

    def retract(self, X, D, step, state=None):
        bound = None
        if self.direction_norm is not None:
            bound = (step * self.direction_norm) ** 2 + 4.0 * self.retraction_tol * (1.0 + step)
        return polar_retraction(X - step * D, self.retraction_tol, bound=bound)

    def distance(self, X) -> float:
        """``‖XᵀX − I‖_F/√k`` in tall orientation (``k`` columns); the largest over blocks."""
        _, (Xt,) = orient(X)
        k = Xt.shape[-1]
        eye = torch.eye(k, device=X.device, dtype=X.dtype)
        return float((torch.linalg.matrix_norm(Xt.mT @ Xt - eye) / math.sqrt(k)).max())


@dataclass(frozen=True)
class StiefelBlocks(Stiefel):
    """Each block of ``block_size`` consecutive rows (``blocks="rows"``) or columns of the matrix
    on its own Stiefel manifold; the view is the batch of blocks, so one batched SVD/msign
    serves them all. Shapes whose blocked dimension ``block_size`` does not divide are refused."""

    batched = False  # its view is already a stack (of blocks)

    block_size: int = 64
    blocks: str = "rows"

    def unsupported_reason(self, shape):
        dim = shape[0] if self.blocks == "rows" else shape[1]
        if dim % self.block_size:
            return f"its {self.blocks} ({dim}) are not divisible by block_size={self.block_size} (shape {tuple(shape)})"
        return None

    def view(self, W):
        M = W if self.blocks == "rows" else W.mT
        return M.reshape(M.shape[0] // self.block_size, self.block_size, M.shape[1])

    def unview(self, X, shape):
        M = X.reshape(-1, shape[1] if self.blocks == "rows" else shape[0])
        return M if self.blocks == "rows" else M.mT


@dataclass(frozen=True)
class Grassmann(Stiefel):
    """The Grassmann manifold ``Gr(n, k)`` of ``k``-dimensional subspaces of ``Rⁿ``, a point
    represented by an orthonormal basis (columns of a tall matrix, rows of a wide one). The
    horizontal space at ``X`` is ``{A : XᵀA = 0}``, its projection ``(I − XXᵀ)A`` (an orthogonal
    projection because ``X`` is orthonormal). Square matrices are refused: ``Gr(n, n)`` is a single
    point, where every horizontal vector is 0."""

    def unsupported_reason(self, shape):
        if shape[0] == shape[1]:
            return f"Gr(n, n) is a single point, a square matrix {tuple(shape)} would never move"
        return None

    def tangent(self, X, A):
        flip, (Xt, At) = orient(X, A)
        P = At - Xt @ (Xt.mT @ At)
        return P.mT if flip else P
