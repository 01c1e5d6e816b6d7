"""The geometric optimizers of seed 002 (DESIGN §4), each a real Riemannian or projected method
whose constraint holds after every step.

============================  =====================================  ==========================
optimizer                     constraint set (per matrix)            shapes it applies to
============================  =====================================  ==========================
:class:`Oblique`              unit-norm columns (or rows)            every matrix
:class:`SLMuon`               ``det W = 1``                          square
:class:`Symplectic`           ``Wᵀ J W = J``                         square, even size
:class:`L1Stiefel`            ``WᵀW = I`` (+ an ℓ1 penalty)          every matrix
:class:`BlockStiefel`         each block of rows/columns on Stiefel  blocked dim % block_size == 0
:class:`DoublyStochastic`     ``W ≥ 0``, ``W1 = 1``, ``Wᵀ1 = 1``     square
:class:`Grassmann`            span of ``W`` (orthonormal basis)      non-square
============================  =====================================  ==========================

A matrix of another shape follows the optimizer's fallback rule (AdamW at ``fallback_lr`` by
default, as the seed's wrappers did for every layer) when ``unsupported="fallback"``, or makes
the constructor raise a ``ValueError`` naming it when ``unsupported="error"``. An optimizer
none of whose matrices fits its manifold refuses to be built (the seed's Block-Stiefel was a
silent AdamW). Conv kernels are ``out × in·kh·kw`` matrices. Every matrix on a manifold is
projected onto it when the optimizer is built, so build the optimizer *before* loading a
checkpoint's weights.

One step, shared by all seven (:meth:`GeometricOptimizer._riemannian_step`):

1. ``M`` = EMA momentum of the Euclidean gradient (``momentum=0``: the gradient itself);
2. ``D = grad_R f(W)`` = the orthogonal projection of ``M`` onto the tangent space at ``W``
   (for the symplectic group, its coordinates in the Lie algebra; for the Birkhoff polytope the
   normalised gradient of the entropic mirror step), plus the ℓ1 subgradient for L1-Stiefel;
3. ``direction="msign"``: ``D ← P_T(msign(D))``, a Muon-sized step that is still a descent
   direction, ``⟨D_R, P_T(msign(D_R))⟩ = ‖D_R‖_* ≥ 0``; ``"riemannian"``: keep ``D``
   (Riemannian SGD with projection transport of the momentum, as geoopt's ``RiemannianSGD``);
4. ``W ← retract(W, −lr·D)``: renormalise (Oblique), rescale by ``|det|^{-1/n}`` (SL), Cayley
   transform (Symplectic), polar factor (Stiefel, blocks, Grassmann), Sinkhorn of the
   multiplicative step (doubly stochastic).

All of it runs in float32 (determinants, the Cayley solve and Sinkhorn in float64) whatever the
parameter dtype; state is only tensors and plain values, so ``state_dict()`` loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from .base import ON_CONSTRAINT_TOL, MatrixOptimizer, check_positive, check_unit_interval, ema_momentum, record_inner
from .linalg import as_matrix, sym
from .msign import check_schedule, msign, msign_svd, polar_retraction

DIRECTIONS = ("riemannian", "msign")
UNSUPPORTED = ("fallback", "error")
_ORIENTATIONS = ("columns", "rows")


class GeometricOptimizer(MatrixOptimizer):
    """Base of the seven: routing of supported/unsupported matrices, the shared Riemannian step,
    projection at construction, the constraint report.

    A subclass works on a *view* of each matrix (a float32 tensor, possibly a batch of blocks)
    and implements :meth:`_unsupported_reason`, :meth:`_project_point`, :meth:`_tangent`,
    :meth:`_retract`, :meth:`_distance`, and optionally :meth:`_view`/:meth:`_unview`,
    :meth:`_prepare` and :meth:`_riemannian_gradient`.

    Common arguments:
        lr: step size (``direction="msign"``: spectral norm of the step before retraction).
        momentum, nesterov: EMA momentum on the Euclidean gradient, projected at the current
            point every step.
        direction: ``"msign"`` or ``"riemannian"`` (see the module docstring).
        ns_steps, ns_schedule: msign of the direction.
        unsupported: ``"fallback"`` (other shapes follow the fallback rule) or ``"error"``.
        fallback, fallback_lr, fallback_betas, fallback_eps, fallback_momentum,
        fallback_nesterov, fallback_weight_decay, check_finite: as
        :class:`~lightning_spectral.optim.base.MatrixOptimizer`; the fallback rule also drives
        matrices of unsupported shape.
    """

    _directions: tuple[str, ...] = DIRECTIONS

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        unsupported: str = "fallback",
        fallback: str = "adamw",
        fallback_lr: Optional[float] = 1e-3,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        fallback_momentum: float = 0.9,
        fallback_nesterov: bool = False,
        fallback_weight_decay: Optional[float] = 0.0,
        check_finite: bool = True,
    ):
        owner = type(self).__name__
        check_positive(owner, lr=defaults["lr"])
        check_unit_interval(owner, momentum=defaults["momentum"])
        if defaults["direction"] not in self._directions:
            raise ValueError(f"{owner}: direction must be one of {self._directions}, got {defaults['direction']!r}")
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"{owner}: unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
        check_schedule(defaults.get("ns_schedule", "jordan"), defaults.get("ns_steps", 5))
        defaults = dict(defaults, unsupported=unsupported, weight_decay=0.0)
        super().__init__(params, defaults, fallback=fallback, fallback_lr=fallback_lr,
                         fallback_betas=fallback_betas, fallback_eps=fallback_eps,
                         fallback_momentum=fallback_momentum, fallback_nesterov=fallback_nesterov,
                         fallback_weight_decay=fallback_weight_decay, check_finite=check_finite)
        rule = dict(algorithm=fallback, lr=fallback_lr, betas=tuple(fallback_betas), eps=fallback_eps,
                    fallback_momentum=fallback_momentum, fallback_nesterov=fallback_nesterov,
                    weight_decay=fallback_weight_decay or 0.0)
        for group in self.param_groups:
            if group["matrix"]:
                group.setdefault("fallback_rule", dict(rule, lr=rule["lr"] if rule["lr"] is not None else group["lr"]))
        self._check_shapes()
        self._project_onto_manifold()

    # -- hooks ----------------------------------------------------------------------------
    def _unsupported_reason(self, group: dict[str, Any], shape: torch.Size) -> Optional[str]:
        """``None`` when an ``out × in`` matrix of this shape lives on the manifold, else why not."""
        return None

    def _view(self, group: dict[str, Any], W: torch.Tensor) -> torch.Tensor:
        return W

    def _unview(self, group: dict[str, Any], X: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return X

    def _prepare(self, group: dict[str, Any], X: torch.Tensor) -> Any:
        """Per-step quantities shared by the projection and the retraction (e.g. ``W⁻ᵀ``)."""
        return None

    def _tangent(self, group: dict[str, Any], X: torch.Tensor, A: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def _riemannian_gradient(self, group, X: torch.Tensor, G: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self._tangent(group, X, G, ctx)

    def _retract(self, group, X: torch.Tensor, D: torch.Tensor, step: float, state: dict, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def _project_point(self, group: dict[str, Any], X: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def _distance(self, group: dict[str, Any], X: torch.Tensor) -> float:
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------
    def on_manifold(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``p`` (in a matrix group) is kept on the manifold (else: the fallback rule)."""
        return self._unsupported_reason(group, as_matrix(p).shape) is None

    def _check_shapes(self) -> None:
        owner, supported, seen = type(self).__name__, 0, []
        for index, group in enumerate(self.param_groups):
            if not group["matrix"]:
                continue
            for i, p in enumerate(group["params"]):
                reason = self._unsupported_reason(group, as_matrix(p).shape)
                if reason is None:
                    supported += 1
                    continue
                seen.append(f"{self.param_name(index, i)}: {reason}")
                if group["unsupported"] == "error":
                    raise ValueError(
                        f"{owner}: {self.param_name(index, i)} cannot be kept on the manifold ({reason}). "
                        "Pass unsupported='fallback' to train such matrices with the fallback rule, or put "
                        "them in a group with matrix=False."
                    )
        if supported == 0:
            detail = "; ".join(seen[:4]) + ("; ..." if len(seen) > 4 else "")
            raise ValueError(f"{owner}: no matrix parameter fits the manifold, so nothing would be constrained "
                             f"({detail or 'there are no matrix parameters'})")

    @torch.no_grad()
    def _project_onto_manifold(self) -> None:
        """Start on the manifold (once, when the optimizer is built), unless already there (see
        :data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL`)."""
        for group in self.param_groups:
            if not group["matrix"]:
                continue
            for p in group["params"]:
                if self.on_manifold(group, p) and self._constraint_distance(group, p, self.state[p]) > ON_CONSTRAINT_TOL:
                    W = as_matrix(p).float()
                    X = self._project_point(group, self._view(group, W), self.state[p])
                    p.copy_(self._unview(group, X, W.shape).view_as(p))

    def _riemannian_step(self, group: dict[str, Any], state: dict, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """The one step every optimizer here takes: Riemannian gradient, optional msign
        normalisation kept in the tangent space, retraction. ``W``, ``G``: float32 matrices."""
        X, Gv = self._view(group, W), self._view(group, G)
        ctx = self._prepare(group, X)
        D = self._riemannian_gradient(group, X, Gv, ctx)
        if group["direction"] == "msign":
            D = self._tangent(group, X, msign(D, group["ns_steps"], group["ns_schedule"]), ctx)
        return self._unview(group, self._retract(group, X, D, group["lr"], state, ctx), W.shape)

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        off = [p for p in params if not self.on_manifold(group, p)]
        if off:
            self._fallback_step(dict(group["fallback_rule"]), off)
        for p in params:
            if not self.on_manifold(group, p):
                continue
            state = self.state[p]
            G = as_matrix(ema_momentum(state, p.grad, group["momentum"], group["nesterov"])).float()
            W = as_matrix(p).float()
            p.copy_(self._riemannian_step(group, state, W, G).view_as(p))

    @torch.no_grad()
    def _constraint_distance(self, group, p, state) -> Optional[float]:
        if not self.on_manifold(group, p):
            return None
        return self._distance(group, self._view(group, as_matrix(p).float()))


def _check_orientation(owner: str, name: str, value: str) -> None:
    if value not in _ORIENTATIONS:
        raise ValueError(f"{owner}: {name} must be one of {_ORIENTATIONS}, got {value!r}")


def _check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
class Oblique(GeometricOptimizer):
    """The oblique manifold: every column of ``W`` (``out × in``; ``dim="rows"``: every row) on
    the sphere of radius ``radius``, i.e. a product of spheres. Applies to every matrix.

    Riemannian gradient ``G − W diag(⟨w_j, g_j⟩)/r²`` (each column's radial part removed),
    step, retraction ``w_j ← r·w_j/‖w_j‖``. ``dim="columns"`` is the seed's choice (the fan-out
    vector of each input unit); ``"rows"`` is weight normalisation of each output unit.

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

    def _view(self, group, W):
        return W if group["dim"] == "columns" else W.mT

    def _unview(self, group, X, shape):
        return X if group["dim"] == "columns" else X.mT

    def _tangent(self, group, X, A, ctx):
        return A - X * ((X * A).sum(0, keepdim=True) / group["radius"] ** 2)

    def _retract(self, group, X, D, step, state, ctx):
        Y = X - step * D
        return Y * (group["radius"] / Y.norm(dim=0, keepdim=True).clamp_min(1e-30))

    def _project_point(self, group, X, state):
        norms = X.norm(dim=0, keepdim=True)
        X = torch.where(norms > 0, X, torch.ones_like(X))  # a zero column gets the uniform direction
        return X * (group["radius"] / X.norm(dim=0, keepdim=True))

    def _distance(self, group, X) -> float:
        """``max_j |‖w_j‖/r − 1|``."""
        return float((X.norm(dim=0) / group["radius"] - 1.0).abs().max())


# ---------------------------------------------------------------------------------------------
class _MatrixGroupOptimizer(GeometricOptimizer):
    """Shared constructor of the optimizers on a matrix Lie group (:class:`SLMuon`,
    :class:`Symplectic`): a step in Lie-algebra coordinates, optionally orthogonalised by msign."""

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", ns_steps: int = 5, ns_schedule: str = "jordan", **kwargs: Any):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, direction=direction, ns_steps=ns_steps,
                        ns_schedule=ns_schedule)
        super().__init__(params, defaults, **kwargs)


class SLMuon(_MatrixGroupOptimizer):
    """The special linear group ``SL(n) = {W : det W = 1}`` (volume preserving), for square
    matrices; non-square ones take the fallback rule (``unsupported="fallback"``) or are refused.

    Tangent space at ``W``: ``{A : tr(W⁻¹A) = 0} = {W X : tr X = 0}``. The step is taken in the
    Lie-algebra coordinates ``X`` (left-invariant metric ``⟨WX, WY⟩ = tr(XᵀY)``, as for
    :class:`Symplectic`): ``f(W(I + tX)) ≈ f(W) + t⟨WᵀM, X⟩``, so the Riemannian gradient is
    ``X = P₀(WᵀM)``, ``P₀(A) = A − (tr A/n) I``; ``direction="msign"`` (default) uses
    ``P₀(msign(X))``: Muon's step, volume preserving and still a descent direction
    (``⟨P₀(WᵀM), P₀(msign(P₀(WᵀM)))⟩ = ‖P₀(WᵀM)‖_* ≥ 0``). The step ``Y = W(I − lr·X)`` changes
    every singular value by a factor within ``1 ± lr·‖X‖₂``; if ``det Y ≤ 0`` anyway it is halved
    until ``det Y > 0`` (``W`` stays in the identity's component). Retraction
    ``W ← Y·(det Y)^{-1/n}``: ``det W = 1`` exactly in float64 (``slogdet``).

    Why not the additive ``W − lr·P(msign(P(M)))`` with the Euclidean projection
    ``P(A) = A − (⟨W⁻ᵀ, A⟩/‖W⁻ᵀ‖²)W⁻ᵀ``: measured on a small MLP, absolute steps drive the small
    singular values through zero within a few dozen steps (σ_min ≈ 1e-8, then every step is
    halved to nothing and the layer freezes). ``SL(n)`` is not compact, though: a loss that wants
    large weights gets them here too (multiplicatively, by shrinking other singular values), and
    the float32 weights carry ``|det W − 1| ≈ n·eps·κ(W)``; watch ``κ(W)`` on long runs.

    Projection at construction: flip the sign of the first row if ``det W < 0``, lift singular
    values below ``1e-3·σ₁`` (a singular matrix has no volume to rescale), rescale.
    """


    def _unsupported_reason(self, group, shape):
        return None if shape[0] == shape[1] else f"SL(n) needs a square matrix, got {tuple(shape)}"

    def _riemannian_gradient(self, group, X, G, ctx):
        return self._tangent(group, X, X.mT @ G, ctx)

    def _tangent(self, group, X, A, ctx):
        return A - torch.eye(A.shape[-1], device=A.device, dtype=A.dtype) * (torch.diagonal(A).mean())

    @staticmethod
    def _unit_det(Y: torch.Tensor, logabs: torch.Tensor) -> torch.Tensor:
        return (Y.double() * torch.exp(-logabs / Y.shape[-1])).float()

    def _retract(self, group, X, A, step, state, ctx):
        W, WA = X.double(), X.double() @ A.double()
        for _ in range(40):
            Y = W - step * WA
            sign, logabs = torch.linalg.slogdet(Y)
            if sign > 0 and torch.isfinite(logabs):
                return self._unit_det(Y, logabs)
            step *= 0.5
        return X

    def _project_point(self, group, X, state):
        X = X.double()
        U, S, Vh = torch.linalg.svd(X)
        if S[-1] < 1e-3 * S[0]:
            X = (U * S.clamp_min(1e-3 * S[0])) @ Vh
        sign, logabs = torch.linalg.slogdet(X)
        if sign < 0:
            X = X.clone()
            X[0] = -X[0]
        return self._unit_det(X, logabs)

    def _distance(self, group, X) -> float:
        """``|det W − 1|`` (float64, of the float32 weights)."""
        sign, logabs = torch.linalg.slogdet(X.double())
        return abs(float(sign * torch.exp(logabs)) - 1.0)


# ---------------------------------------------------------------------------------------------
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


class Symplectic(_MatrixGroupOptimizer):
    """The symplectic group ``Sp(2k) = {W : WᵀJW = J}``, ``J = [[0, I], [−I, 0]]``, for square
    matrices of even size; other shapes take the fallback rule or are refused.

    Tangent space at ``W``: ``{W J S : S symmetric}`` (``JS`` Hamiltonian). With
    ``f(W·(I + t JS)) ≈ f(W) + t⟨sym(JᵀWᵀG), S⟩``, the steepest direction in these coordinates is
    ``S = sym(JᵀWᵀM)`` (``direction="msign"``: ``S ← sym(msign(S))``, symmetric with unit
    spectral norm and still ``⟨sym(JᵀWᵀM), S⟩ = ‖·‖_* ≥ 0``). Retraction by the Cayley transform
    ``W ← W (I + ½lr·JS)⁻¹ (I − ½lr·JS)``, which maps the Hamiltonian ``JS`` into ``Sp(2k)``, so
    ``WᵀJW = J`` holds exactly up to round-off (solved in float64).

    Projection at construction: the nearest (Frobenius) *orthogonal* symplectic matrix, i.e.
    the polar factor of the complex-linear part ``[[A, −B], [B, A]]``, ``A = ½(W₁₁ + W₂₂)``,
    ``B = ½(W₂₁ − W₁₂)`` (``Sp ∩ O = U(k)``). It keeps the randomness of the initialisation and
    starts with every singular value 1 (the seed rescaled to the wrong norm and was not
    symplectic at all).
    """


    def _unsupported_reason(self, group, shape):
        if shape[0] != shape[1] or shape[0] % 2:
            return f"Sp(2k) needs a square matrix of even size, got {tuple(shape)}"
        return None

    def _prepare(self, group, X):
        return symplectic_form(X.shape[-1], X.device, torch.float32)

    def _riemannian_gradient(self, group, X, G, J):
        return sym(J.mT @ X.mT @ G)

    def _tangent(self, group, X, A, J):
        return sym(A)

    def _retract(self, group, X, S, step, state, J):
        n = X.shape[-1]
        H = (0.5 * step) * (J.double() @ S.double())
        eye = torch.eye(n, dtype=torch.float64, device=X.device)
        W = X.double() @ torch.linalg.solve(eye + H, eye - H)
        # One Newton step on WᵀJW = J, W ← W(I + ½JE), E = WᵀJW − J: removes the drift that
        # float32 storage of the previous iterates left (quadratically), so it cannot accumulate.
        J = J.double()
        return (W @ (eye + 0.5 * J @ (W.mT @ J @ W - J))).float()

    def _project_point(self, group, X, state):
        k = X.shape[-1] // 2
        X = X.double()
        A = 0.5 * (X[:k, :k] + X[k:, k:])
        B = 0.5 * (X[k:, :k] - X[:k, k:])
        complex_part = torch.cat([torch.cat([A, -B], 1), torch.cat([B, A], 1)], 0)
        return msign_svd(complex_part).float()

    def _distance(self, group, X) -> float:
        """``‖WᵀJW − J‖_F / (√n · max(1, ‖W‖₂²))`` (float64): the absolute error per row while
        ``‖W‖₂ ≤ 1``, relative to the scale of ``WᵀJW`` beyond (``Sp(2k)`` is not compact, and
        float32 storage alone leaves an error of about ``eps·‖W‖₂²``)."""
        n = X.shape[-1]
        J = symplectic_form(n, X.device)
        X = X.double()
        scale = max(1.0, float(torch.linalg.matrix_norm(X, ord=2)) ** 2)
        return float(torch.linalg.matrix_norm(X.mT @ J @ X - J)) / (math.sqrt(n) * scale)


# ---------------------------------------------------------------------------------------------
class _StiefelBlocks(GeometricOptimizer):
    """Matrices seen as a batch of blocks, each on its own Stiefel manifold (tall orientation:
    ``XᵀX = I`` for every block ``X``); the whole matrix is one block unless a subclass says
    otherwise. Retraction: the polar factor by :func:`~lightning_spectral.optim.msign.polar_retraction`
    to ``retraction_tol`` in float32 (``W − lr·D`` with tangent ``D`` has singular values in
    ``[1, √(1 + lr²‖D‖₂²)]``: one or two fixed-point steps)."""

    def _blocking(self, group: dict[str, Any], shape: torch.Size) -> tuple[str, int]:
        return "rows", shape[0]

    def _view(self, group, W):
        axis, size = self._blocking(group, W.shape)
        M = W if axis == "rows" else W.mT
        X = M.reshape(M.shape[0] // size, size, M.shape[1])
        return X.mT if size < M.shape[1] else X

    def _unview(self, group, X, shape):
        axis, size = self._blocking(group, shape)
        other = shape[1] if axis == "rows" else shape[0]
        if size < other:
            X = X.mT
        M = X.reshape(-1, other)
        return M if axis == "rows" else M.mT

    def _tangent(self, group, X, A, ctx):
        return A - X @ sym(X.mT @ A)

    def _retract(self, group, X, D, step, state, ctx):
        return polar_retraction(X - step * D, group["retraction_tol"])

    def _project_point(self, group, X, state):
        return msign_svd(X)

    def _distance(self, group, X) -> float:
        """``max over blocks ‖XᵀX − I‖_F/√k`` (tall orientation, ``k`` columns)."""
        k = X.shape[-1]
        eye = torch.eye(k, device=X.device)
        return float((torch.linalg.matrix_norm(X.mT @ X - eye) / math.sqrt(k)).max())


def _stiefel_defaults(owner, lr, momentum, nesterov, direction, ns_steps, ns_schedule, retraction_tol, **extra):
    check_positive(owner, retraction_tol=retraction_tol)
    return dict(lr=lr, momentum=momentum, nesterov=nesterov, direction=direction, ns_steps=ns_steps,
                ns_schedule=ns_schedule, retraction_tol=retraction_tol, **extra)


class L1Stiefel(_StiefelBlocks):
    """The Stiefel manifold (orthonormal columns of a tall matrix, orthonormal rows of a wide
    one, the orthogonal group for a square one; every matrix) for ``f(W) + λ‖W‖₁``: the seed's
    "sparse + orthogonal".

    Riemannian direction ``P_T(M + λ·sign(W))``, ``P_T(A) = A − W sym(WᵀA)`` (``sign(W)`` is the
    ℓ1 subgradient), msign-normalised by default, retraction ``W ← msign(W − lr·D)`` (polar
    factor). ``l1_weight=0`` is plain Riemannian descent on the Stiefel manifold. The ℓ1 term
    pulls each orthonormal frame towards a sparse (signed-permutation-like) one; its scale is
    that of the momentum ``M`` (``direction="msign"`` normalises the sum, not each term).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", l1_weight: float = 1e-4, ns_steps: int = 5, ns_schedule: str = "jordan",
                 retraction_tol: float = 1e-6, **kwargs: Any):
        if not isinstance(l1_weight, (int, float)) or not math.isfinite(l1_weight) or l1_weight < 0:
            raise ValueError(f"L1Stiefel: l1_weight must be a finite number >= 0, got {l1_weight!r}")
        defaults = _stiefel_defaults(type(self).__name__, lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol, l1_weight=float(l1_weight))
        super().__init__(params, defaults, **kwargs)

    def _riemannian_gradient(self, group, X, G, ctx):
        if group["l1_weight"]:
            G = G + group["l1_weight"] * torch.sign(X)
        return self._tangent(group, X, G, ctx)


class BlockStiefel(_StiefelBlocks):
    """Each block of ``block_size`` consecutive rows (``blocks="rows"``, e.g. the heads of an
    attention projection ``d_model × d_model`` with ``block_size = head_dim``) or columns on its
    own Stiefel manifold (orthonormal rows within a wide block, orthonormal columns within a
    tall one). It takes every matrix whose blocked dimension is divisible by ``block_size``; by
    default (``unsupported="error"``) any other matrix makes the constructor raise, naming it
    (the seed's version matched parameters by a name attribute that was never set, and so was
    a silent AdamW). All blocks of a matrix go through one batched msign.

    Direction ``P_T(M)`` block by block, msign-normalised per block by default; retraction: the
    polar factor of each block.
    """

    def __init__(self, params: Iterable[Any], block_size: int = 64, blocks: str = "rows", lr: float = 0.05,
                 momentum: float = 0.9, nesterov: bool = True, direction: str = "msign", ns_steps: int = 5,
                 ns_schedule: str = "jordan", retraction_tol: float = 1e-6, unsupported: str = "error",
                 **kwargs: Any):
        _check_int("BlockStiefel", "block_size", block_size)
        _check_orientation("BlockStiefel", "blocks", blocks)
        defaults = _stiefel_defaults(type(self).__name__, lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol, block_size=block_size, blocks=blocks)
        super().__init__(params, defaults, unsupported=unsupported, **kwargs)

    def _blocking(self, group, shape):
        return group["blocks"], group["block_size"]

    def _unsupported_reason(self, group, shape):
        dim = shape[0] if group["blocks"] == "rows" else shape[1]
        if dim % group["block_size"]:
            return (f"its {group['blocks']} ({dim}) are not divisible by block_size={group['block_size']} "
                    f"(shape {tuple(shape)})")
        return None


class Grassmann(_StiefelBlocks):
    """Steepest descent on the Grassmann manifold ``Gr(n, k)`` of ``k``-dimensional subspaces of
    ``Rⁿ``, represented by an orthonormal basis: a tall ``W`` (``n × k``, ``n > k``) keeps
    orthonormal columns, a wide one (``k × n``) orthonormal rows (the row space is the point).

    Horizontal (Riemannian) gradient ``(I − WWᵀ)M``, correct because ``W`` *is* orthonormal
    (projected onto the Stiefel manifold at construction and retracted every step; the seed
    applied it to merely row-normalised ``W``, where ``I − WWᵀ`` has negative eigenvalues and
    the step goes uphill), msign-normalised by default (``msign`` of a horizontal matrix is
    horizontal); retraction: the polar factor of ``W − lr·D``.

    Square matrices: ``Gr(n, n)`` is a single point and ``(I − WWᵀ)M = 0``, so constraining them
    would freeze them (the seed's bug on its square layer); they take the fallback rule
    (``unsupported="fallback"``) or are refused (``"error"``). Note that a layer's loss is not
    invariant under ``W → WR`` (a change of basis of the subspace): this moves the subspace only,
    never the basis within it, a real restriction for an MLP weight (descent still holds).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 direction: str = "msign", ns_steps: int = 5, ns_schedule: str = "jordan", retraction_tol: float = 1e-6,
                 **kwargs: Any):
        defaults = _stiefel_defaults(type(self).__name__, lr, momentum, nesterov, direction, ns_steps, ns_schedule,
                                     retraction_tol)
        super().__init__(params, defaults, **kwargs)

    def _unsupported_reason(self, group, shape):
        if shape[0] == shape[1]:
            return f"Gr(n, n) is a single point, a square matrix {tuple(shape)} would never move"
        return None

    def _tangent(self, group, X, A, ctx):
        return A - X @ (X.mT @ A)


# ---------------------------------------------------------------------------------------------
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


class DoublyStochastic(GeometricOptimizer):
    """The Birkhoff polytope (non-negative, unit row and column sums; its interior is the
    doubly stochastic multinomial manifold) for square matrices, meant for permutation
    learning; non-square ones take the fallback rule or are refused.

    Entropic mirror descent: ``W ← Sinkhorn(W ⊙ exp(−lr·M̂))`` with ``M̂ = M/max|M|``
    (``normalize="max"``: ``lr`` is the largest multiplicative log-change of an entry per step;
    ``"none"``: the raw momentum; entries are floored at ``1e-12`` so the iterate stays in the
    interior, where a balancing always exists). To first order this is the Riemannian gradient step of the
    Fisher metric, so it is a descent direction. Non-negativity is exact (a product with
    ``exp``), the column sums exact and the row sums within ``sinkhorn_tol``.

    Start: ``Sinkhorn(exp(Z/init_temperature))``, ``Z`` the standardised initial weights. The
    seed started from the uniform ``1/n`` matrix and re-exponentiated the weights every step,
    which kept the layer at the rank-1 averaging matrix; a random, spread start is full rank and
    near a (soft) permutation for a small temperature. Even so a doubly stochastic layer only
    mixes features (``σ₁ = 1`` on the all-ones direction, the others ≤ 1), so an MLP with one
    reaches far less accuracy than an unconstrained one (the seed's 39 % on MNIST).
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

    def _unsupported_reason(self, group, shape):
        return None if shape[0] == shape[1] else f"the Birkhoff polytope needs a square matrix, got {tuple(shape)}"

    def _riemannian_gradient(self, group, X, G, ctx):
        if group["normalize"] == "max":
            G = G / G.abs().max().clamp_min(1e-30)
        return G

    def _retract(self, group, X, D, step, state, ctx):
        # Entries are floored at 1e-12: the iterate stays in the interior (positive, so a doubly
        # stochastic scaling exists); exact zeros could leave a pattern without total support.
        K = (X.double() * torch.exp(-step * D.double())).clamp_min(1e-12)
        W, iterations, residual = sinkhorn(K, group["sinkhorn_tol"], group["sinkhorn_max_iters"])
        record_inner(state, iterations, residual)
        return W.float()

    def _project_point(self, group, X, state):
        Z = (X - X.mean()) / X.std().clamp_min(1e-30)
        W, iterations, residual = sinkhorn(torch.exp(Z.double() / group["init_temperature"]),
                                           group["sinkhorn_tol"], group["init_max_iters"])
        record_inner(state, iterations, residual)
        return W.float()

    def _distance(self, group, X) -> float:
        """``max(max|row sum − 1|, max|column sum − 1|, max(−min W, 0))`` (float64 sums)."""
        X = X.double()
        return max(float((X.sum(1) - 1).abs().max()), float((X.sum(0) - 1).abs().max()), float((-X).max().clamp_min(0)))
