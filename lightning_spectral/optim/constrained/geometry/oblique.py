"""The oblique manifold: every column (or row) of a matrix on a sphere, a product of spheres
(Absil & Gallivan 2006, "Joint diagonalization on the oblique manifold")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Geometry

ORIENTATIONS = ("columns", "rows")


@dataclass(frozen=True)
class Oblique(Geometry):
    """Every column (``dim="columns"``; ``"rows"``: every row) of norm ``radius``. The view is
    the matrix whose columns are constrained; tangent projection ``A − X diag(⟨xⱼ, aⱼ⟩)/r²``
    (each column's radial part removed); retraction and projection ``xⱼ ← r·xⱼ/‖xⱼ‖``."""

    dim: str = "columns"
    radius: float = 1.0

    def view(self, W):
        return W if self.dim == "columns" else W.mT

    def unview(self, X, shape):
        return X if self.dim == "columns" else X.mT

    def project(self, X, state=None):
        """A zero column has no nearest point; it gets the uniform direction ``r·1/√n``."""
        norms = X.norm(dim=0, keepdim=True)
        X = torch.where(norms > 0, X, torch.ones_like(X))
        return X * (self.radius / X.norm(dim=0, keepdim=True))

    def tangent(self, X, A):
        return A - X * ((X * A).sum(0, keepdim=True) / self.radius**2)

    def retract(self, X, D, step, state=None):
        Y = X - step * D
        return Y * (self.radius / Y.norm(dim=0, keepdim=True).clamp_min(1e-30))

    def distance(self, X) -> float:
        """``max_j |‖xⱼ‖/r − 1|``."""
        return float((X.norm(dim=0) / self.radius - 1.0).abs().max())
