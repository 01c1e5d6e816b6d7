"""The one protocol every constraint set implements, modelled on geoopt's ``Manifold`` classes.

A geometry knows a set of matrices and nothing about optimizers: which shapes it can hold,
the nearest point of the set (:meth:`Geometry.project`), the tangent projection, a retraction
and a distance. The optimizers of :mod:`lightning_spectral.optim.constrained` bind one geometry
to a direction rule.

Points and tangent vectors live in the set's own representation ``X = view(W)`` of the float32
``out × in`` matrix ``W``: the matrix itself unless the set works on a transpose (oblique rows)
or a batch of blocks (block Stiefel). On a matrix Lie group a tangent vector at ``X`` is given
by its Lie-algebra coordinates ``A`` (the move is ``X A``), so the metric is left invariant.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Geometry:
    """A constraint set for one matrix. Subclasses implement :meth:`project`, :meth:`tangent`,
    :meth:`retract` and :meth:`distance`, and where needed the other hooks.

    ``state`` (optional in :meth:`project` and :meth:`retract`) is the parameter's optimizer
    state: a set may keep warm starts there and record its inner solves (tensors and plain values
    only, so checkpoints load with ``weights_only=True``).

    ``batched``: :meth:`view` is the identity, and :meth:`tangent`, :meth:`riemannian_gradient`
    and :meth:`retract` also take a stack of matrices (``B × out × in``, with a state whose
    tensors are stacked the same way), treating each matrix as if it were alone; the optimizers
    then step same-shaped matrices together.
    """

    batched = False

    def unsupported_reason(self, shape: torch.Size) -> Optional[str]:
        """``None`` when an ``out × in`` matrix of this shape can be kept on the set, else why not."""
        return None

    def view(self, W: torch.Tensor) -> torch.Tensor:
        """The representation the other methods work on (default: ``W`` itself)."""
        return W

    def unview(self, X: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`view` for an ``out × in`` matrix of ``shape``."""
        return X

    def project(self, X: torch.Tensor, state: Optional[dict] = None) -> torch.Tensor:
        """A point of the set nearest ``X`` (raises ``ValueError`` saying why if there is none)."""
        raise NotImplementedError

    def tangent(self, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection of ``A`` onto the tangent space at ``X`` (idempotent)."""
        raise NotImplementedError

    def riemannian_gradient(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """The Riemannian gradient at ``X`` of a function with Euclidean gradient ``G``."""
        return self.tangent(X, G)

    def retract(self, X: torch.Tensor, D: torch.Tensor, step: float, state: Optional[dict] = None) -> torch.Tensor:
        """The point reached from ``X`` by the move ``−step·D`` (``D`` tangent), back on the set."""
        raise NotImplementedError

    def distance(self, X: torch.Tensor) -> float:
        """Scale-free distance of ``X`` from the set (0 on it)."""
        raise NotImplementedError

    def contains(self, X: torch.Tensor, tol: float) -> bool:
        """``X`` is within ``tol`` of the set."""
        return abs(self.distance(X)) <= tol


def record_inner(state: dict, iterations: int, residual: Any) -> None:
    """Keep the last inner solve's iteration count and residual in the parameter's state."""
    state["inner_iterations"] = int(iterations)
    state["inner_residual"] = residual if isinstance(residual, torch.Tensor) else torch.tensor(float(residual))
