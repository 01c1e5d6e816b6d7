"""Seven bindings of the constrained skeleton whose direction is the Riemannian gradient (or its
msign, ``P_T(msign(D_R))``; a mirror step on the Birkhoff polytope) on one constraint set each:
:class:`Oblique`, :class:`SLMuon`, :class:`Symplectic`, :class:`L1Stiefel`, :class:`BlockStiefel`,
:class:`Grassmann`, :class:`DoublyStochastic` (the table: :mod:`..constrained`)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from ..base import check_positive
from . import geometry as geo
from .skeleton import GeometricOptimizer

__all__ = ["BlockStiefel", "DoublyStochastic", "Grassmann", "L1Stiefel", "Oblique", "SLMuon", "Symplectic"]


def _check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_orientation(owner: str, name: str, value: str) -> None:
    if value not in geo.ORIENTATIONS:
        raise ValueError(f"{owner}: {name} must be one of {geo.ORIENTATIONS}, got {value!r}")


# -- Riemannian / msign steps ------------------------------------------------------------------------
class Oblique(GeometricOptimizer):
    """The oblique manifold: every column of ``W`` (``out × in``; ``dim="rows"``: every row) on
    the sphere of radius ``radius`` (:class:`~lightning_spectral.optim.constrained.geometry.Oblique`).
    Applies to every matrix. ``dim="columns"`` keeps the fan-out vector of each input unit;
    ``"rows"`` is weight normalisation of each output unit.

    Args:
        lr, momentum, nesterov, direction, ns_steps, ns_schedule, unsupported, fallback…: see
            :class:`GeometricOptimizer`.
        dim: ``"columns"`` or ``"rows"``.
        radius: the norm each column (row) is kept at.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", dim: str = "columns", radius: float = 1.0, ns_steps: int = 5,
                 ns_schedule: str = "jordan", **kwargs: Any):
        _check_orientation("Oblique", "dim", dim)
        check_positive("Oblique", radius=radius)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, direction=direction, dim=dim,
                        radius=float(radius), ns_steps=ns_steps, ns_schedule=ns_schedule)
        super().__init__(params, defaults, **kwargs)

    @staticmethod
    def geometry(group):
        return geo.Oblique(dim=group["dim"], radius=group["radius"])


class _LieGroupOptimizer(GeometricOptimizer):
    """Shared constructor of the optimizers on a matrix Lie group (:class:`SLMuon`,
    :class:`Symplectic`): a step in Lie-algebra coordinates, optionally orthogonalised by msign."""

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", ns_steps: int = 5, ns_schedule: str = "jordan", **kwargs: Any):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, direction=direction, ns_steps=ns_steps,
                        ns_schedule=ns_schedule)
        super().__init__(params, defaults, **kwargs)


class SLMuon(_LieGroupOptimizer):
    """The special linear group ``SL(n) = {W : det W = 1}`` (volume preserving), for square
    matrices (:class:`~lightning_spectral.optim.constrained.geometry.SpecialLinear`); other shapes take the
    fallback rule (``unsupported="fallback"``) or are refused.

    The step is taken in Lie-algebra coordinates: Riemannian gradient ``X = P₀(WᵀM)``,
    ``P₀(A) = A − (tr A/n) I``; ``direction="msign"`` (default) uses ``P₀(msign(X))``, Muon's step,
    volume preserving and still a descent direction. ``W ← Y·(det Y)^{-1/n}``, ``Y = W(I − lr·X)``,
    which changes every singular value by a factor within ``1 ± lr·‖X‖₂``.

    Why not the additive ``W − lr·P(msign(P(M)))`` with the Euclidean projection
    ``P(A) = A − (⟨W⁻ᵀ, A⟩/‖W⁻ᵀ‖²)W⁻ᵀ``: measured on a small MLP, absolute steps drive the small
    singular values through zero within a few dozen steps (σ_min ≈ 1e-8, then every step is
    halved to nothing and the layer freezes). ``SL(n)`` is not compact, though: a loss that wants
    large weights gets them here too (multiplicatively, by shrinking other singular values), and
    the float32 weights carry ``|det W − 1| ≈ n·eps·κ(W)``; watch ``κ(W)`` on long runs.
    """

    @staticmethod
    def geometry(group):
        return geo.SpecialLinear()


class Symplectic(_LieGroupOptimizer):
    """The symplectic group ``Sp(2k) = {W : WᵀJW = J}``, ``J = [[0, I], [−I, 0]]``, for square
    matrices of even size (:class:`~lightning_spectral.optim.constrained.geometry.SymplecticGroup`); other
    shapes take the fallback rule or are refused.

    The steepest direction in the coordinates ``S`` of the tangent vector ``WJS`` is
    ``S = sym(JᵀWᵀM)`` (``direction="msign"``: ``S ← sym(msign(S))``, symmetric with unit spectral
    norm, still a descent direction); retraction by the Cayley transform, so ``WᵀJW = J`` holds up
    to round-off. Start: the nearest orthogonal symplectic matrix, which keeps the randomness of
    the initialisation and has every singular value 1.
    """

    @staticmethod
    def geometry(group):
        return geo.SymplecticGroup()


def _stiefel_defaults(owner, lr, momentum, nesterov, direction, ns_steps, ns_schedule, retraction_tol, **extra):
    check_positive(owner, retraction_tol=retraction_tol)
    return dict(lr=lr, momentum=momentum, nesterov=nesterov, direction=direction, ns_steps=ns_steps,
                ns_schedule=ns_schedule, retraction_tol=retraction_tol, **extra)


class L1Stiefel(GeometricOptimizer):
    """The Stiefel manifold (every matrix) for ``f(W) + λ‖W‖₁``: sparse and orthogonal.

    Riemannian direction ``P_T(M + λ·sign(W))``, ``P_T(A) = A − W sym(WᵀA)`` (``sign(W)`` is the
    ℓ1 subgradient), msign-normalised by default, retraction: the polar factor of ``W − lr·D``.
    ``l1_weight=0`` is plain Riemannian descent on the Stiefel manifold. The ℓ1 term pulls each
    orthonormal frame towards a sparse (signed-permutation-like) one; its scale is that of the
    momentum ``M`` (``direction="msign"`` normalises the sum, not each term).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", l1_weight: float = 1e-4, ns_steps: int = 5, ns_schedule: str = "jordan",
                 retraction_tol: float = 1e-6, **kwargs: Any):
        if not isinstance(l1_weight, (int, float)) or not math.isfinite(l1_weight) or l1_weight < 0:
            raise ValueError(f"L1Stiefel: l1_weight must be a finite number >= 0, got {l1_weight!r}")
        defaults = _stiefel_defaults("L1Stiefel", lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol, l1_weight=float(l1_weight))
        super().__init__(params, defaults, **kwargs)

    @staticmethod
    def geometry(group):
        return geo.Stiefel(retraction_tol=group["retraction_tol"])

    def _direction(self, group, geometry, X, G, state):
        if group["l1_weight"]:
            G = G + group["l1_weight"] * torch.sign(X)
        return super()._direction(group, geometry, X, G, state)


class BlockStiefel(GeometricOptimizer):
    """Each block of ``block_size`` consecutive rows (``blocks="rows"``, e.g. the heads of an
    attention projection ``d_model × d_model`` with ``block_size = head_dim``) or columns on its
    own Stiefel manifold (:class:`~lightning_spectral.optim.constrained.geometry.StiefelBlocks`). It takes
    every matrix whose blocked dimension is divisible by ``block_size``; by default
    (``unsupported="error"``) any other matrix makes the constructor raise, naming it. All
    blocks of a matrix go through one batched msign.

    Direction ``P_T(M)`` block by block, msign-normalised per block by default; retraction: the
    polar factor of each block.
    """

    def __init__(self, params: Iterable[Any], block_size: int = 64, blocks: str = "rows", lr: float = 0.05,
                 momentum: float = 0.9, nesterov: bool = True, direction: str = "msign", ns_steps: int = 5,
                 ns_schedule: str = "jordan", retraction_tol: float = 1e-6, unsupported: str = "error",
                 **kwargs: Any):
        _check_int("BlockStiefel", "block_size", block_size)
        _check_orientation("BlockStiefel", "blocks", blocks)
        defaults = _stiefel_defaults("BlockStiefel", lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol, block_size=block_size, blocks=blocks)
        super().__init__(params, defaults, unsupported=unsupported, **kwargs)

    @staticmethod
    def geometry(group):
        return geo.StiefelBlocks(retraction_tol=group["retraction_tol"], block_size=group["block_size"],
                                 blocks=group["blocks"])


class Grassmann(GeometricOptimizer):
    """Steepest descent on the Grassmann manifold ``Gr(n, k)`` of ``k``-dimensional subspaces of
    ``Rⁿ``, represented by an orthonormal basis (:class:`~lightning_spectral.optim.constrained.geometry.Grassmann`):
    a tall ``W`` keeps orthonormal columns, a wide one orthonormal rows (the row space is the point).

    Horizontal gradient ``(I − WWᵀ)M``, an orthogonal projection because ``W`` *is* orthonormal
    (projected at construction and retracted every step; applied to a merely row-normalised ``W``,
    ``I − WWᵀ`` has negative eigenvalues and the step can go uphill), msign-normalised by default
    (``msign`` of a horizontal matrix is horizontal); retraction: the polar factor of ``W − lr·D``.
    Square matrices (``Gr(n, n)`` is a point) take the fallback rule or are refused. A layer's
    loss is not invariant under ``W → WR`` (a change of basis of the subspace): this moves the
    subspace only, never the basis within it, a real restriction for an MLP weight.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", ns_steps: int = 5, ns_schedule: str = "jordan", retraction_tol: float = 1e-6,
                 **kwargs: Any):
        defaults = _stiefel_defaults("Grassmann", lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol)
        super().__init__(params, defaults, **kwargs)

    @staticmethod
    def geometry(group):
        return geo.Grassmann(retraction_tol=group["retraction_tol"])


class DoublyStochastic(GeometricOptimizer):
    """The Birkhoff polytope (non-negative, unit row and column sums) for square matrices, meant
    for permutation learning (:class:`~lightning_spectral.optim.constrained.geometry.Birkhoff`); other shapes,
    and 1×1 matrices (the polytope is the point ``[[1]]``), take the fallback rule or are refused.

    Entropic mirror descent: ``W ← Sinkhorn(W ⊙ exp(−lr·M̂))`` with ``M̂ = M/max|M|``
    (``normalize="max"``: ``lr`` is the largest multiplicative log-change of an entry per step;
    ``"none"``: the raw momentum). To first order this is the Riemannian gradient step of the
    Fisher metric, so it is a descent direction. Start: ``Sinkhorn(exp(Z/init_temperature))``,
    ``Z`` the standardised initial weights: full rank and near a (soft) permutation for a small
    temperature (the uniform ``1/n`` start is the rank-1 averaging matrix and stays there). Even
    so a doubly stochastic layer only mixes features (``σ₁ = 1`` on the all-ones direction, the
    others ≤ 1), so an MLP with one reaches far less accuracy than an unconstrained one.
    """

    _directions = ("mirror",)

    def __init__(self, params: Iterable[Any], lr: float = 0.5, momentum: float = 0.9, nesterov: bool = True,
                 normalize: str = "max", init_temperature: float = 0.5, sinkhorn_tol: float = 1e-6,
                 sinkhorn_max_iters: int = 100, init_max_iters: int = 1000, **kwargs: Any):
        if normalize not in ("max", "none"):
            raise ValueError(f"DoublyStochastic: normalize must be 'max' or 'none', got {normalize!r}")
        check_positive("DoublyStochastic", init_temperature=init_temperature, sinkhorn_tol=sinkhorn_tol)
        _check_int("DoublyStochastic", "sinkhorn_max_iters", sinkhorn_max_iters)
        _check_int("DoublyStochastic", "init_max_iters", init_max_iters)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, direction="mirror", normalize=normalize,
                        init_temperature=float(init_temperature), sinkhorn_tol=float(sinkhorn_tol),
                        sinkhorn_max_iters=sinkhorn_max_iters, init_max_iters=init_max_iters)
        super().__init__(params, defaults, **kwargs)

    @staticmethod
    def geometry(group):
        return geo.Birkhoff(sinkhorn_tol=group["sinkhorn_tol"], sinkhorn_max_iters=group["sinkhorn_max_iters"],
                            init_temperature=group["init_temperature"], init_max_iters=group["init_max_iters"])

    def _direction(self, group, geometry, X, G, state):
        return G / G.abs().max().clamp_min(1e-30) if group["normalize"] == "max" else G
