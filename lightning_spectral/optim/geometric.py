"""The constrained optimizers: one skeleton, nine bindings of a geometry and a direction rule
(:class:`~lightning_spectral.optim.manifold.ManifoldMuon` and
:class:`~lightning_spectral.optim.manifold.SpectralBall`, whose directions solve a dual, in
:mod:`.manifold`; the seven others here).

Every step of every one of them (:meth:`GeometricOptimizer._matrix_step`) is

1. momentum: ``M`` = EMA of the Euclidean gradient (``momentum=0``: the gradient itself);
2. direction: ``D`` from ``M`` at the current point ``X``, by the binding's rule;
3. retraction: ``X ← retract(X, −step·D)`` onto the constraint set,

with the set (the :mod:`~lightning_spectral.optim.geometry`) and the direction rule as follows:

=========================  ==================================  =================================  ==================
optimizer                  constraint set (per matrix)         direction                          shapes it takes
=========================  ==================================  =================================  ==================
:class:`.ManifoldMuon`     Stiefel ``WᵀW = I``                 ``msign(G + WX)``, dual ``X``      every matrix
:class:`.SpectralBall`     ``‖W‖₂ = R`` or ``≤ R``             ``msign(G + λu₁v₁ᵀ)``, dual ``λ``  every matrix
:class:`Oblique`           unit-norm columns (or rows)         Riemannian / msign                 every matrix
:class:`SLMuon`            ``det W = 1``                       Riemannian / msign, Lie algebra    square
:class:`Symplectic`        ``WᵀJW = J``                        Riemannian / msign, Lie algebra    square, even size
:class:`L1Stiefel`         Stiefel (+ an ℓ1 penalty)           Riemannian / msign                 every matrix
:class:`BlockStiefel`      each block of rows/columns Stiefel  Riemannian / msign per block       block_size divides
:class:`DoublyStochastic`  ``W ≥ 0``, ``W1 = 1``, ``Wᵀ1 = 1``  entropic mirror step               square, n ≥ 2
:class:`Grassmann`         span of ``W`` (orthonormal basis)   Riemannian / msign, horizontal     non-square
=========================  ==================================  =================================  ==================

``direction="riemannian"`` is Riemannian SGD with projection transport of the momentum (as
geoopt's ``RiemannianSGD``); ``"msign"`` is ``P_T(msign(D_R))``, a Muon-sized step that is still
a descent direction, ``⟨D_R, P_T(msign(D_R))⟩ = ‖D_R‖_* ≥ 0`` (Jordan et al. 2024, Muon).

A matrix of a shape the set cannot hold is moved, when the optimizer is built, into a group of
its own right after its matrix group (``matrix=False``, named ``"<group name>_fallback"``, or
``"matrix_fallback"`` for an unnamed group) that follows the fallback rule at ``fallback_lr``,
so learning-rate schedulers reach it; ``unsupported="error"`` makes the constructor raise a
``ValueError`` naming it instead. An optimizer none of whose matrices fits its set refuses to
be built. Conv kernels are ``out × in·kh·kw`` matrices. Every matrix is projected onto its set
when the optimizer is built (unless already within
:data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL` of it), so build the optimizer *before*
loading a checkpoint's weights.

Where the geometry takes stacks (:attr:`~lightning_spectral.optim.geometry.Geometry.batched`:
Stiefel, Grassmann, the spectral sphere/ball) same-shaped matrices of a group are stepped as one
stack (one batched direction and retraction instead of one per matrix), their state written
back per matrix as a step of each alone would leave it.

Direction and retraction run in float32 (determinants, the Cayley solve and Sinkhorn in
float64) whatever the parameter dtype; state is only tensors and plain values.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from . import geometry as geo
from .base import ON_CONSTRAINT_TOL, MatrixOptimizer, check_positive, check_unit_interval, describe_param, ema_momentum
from .geometry import sinkhorn, symplectic_form
from .linalg import as_matrix, msign_cost
from .msign import check_schedule, msign
from .param_groups import MATRIX_KEY
from .sharded import whole

__all__ = ["BlockStiefel", "DoublyStochastic", "GeometricOptimizer", "Grassmann", "L1Stiefel", "Oblique", "SLMuon",
           "Symplectic", "sinkhorn", "symplectic_form"]

DIRECTIONS = ("riemannian", "msign")
CPU_BATCH_MAX_COST = 256**3
"""On a CPU, same-shaped matrices are stacked only when ``m·n·min(m, n)`` is below this: a CPU
runs one large GEMM as fast as a batch of them, and stacking and writing back the state then
cost more than the per-call overhead they save (measured, one thread, stacks of 3–16:
ManifoldMuon amortized 0.8× the per-matrix time at 64 × 64, 0.85× at 128 × 128, 1.15× at
256 × 256; SpectralBall amortized 0.25–0.95×). GPUs always stack (one kernel per stack)."""
UNSUPPORTED = ("fallback", "error")


class GeometricOptimizer(MatrixOptimizer):
    """The skeleton: momentum → direction → retraction on the geometry of each matrix group.

    A binding implements :meth:`geometry` (the set, from the group's hyperparameters) and, when
    its rule is not the Riemannian/msign one, :meth:`_direction`; optionally :meth:`_step_size`
    and :meth:`_state_shapes`.

    Common arguments:
        lr: step size (``direction="msign"``: spectral norm of the step before retraction).
        momentum, nesterov: EMA momentum on the Euclidean gradient, projected at the current
            point every step.
        direction: ``"msign"`` or ``"riemannian"`` (see the module docstring).
        ns_steps, ns_schedule: msign of the direction.
        unsupported: ``"fallback"`` (other shapes follow the fallback rule) or ``"error"``;
            ``None`` for a set that takes every shape (no ``unsupported`` hyperparameter).
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
        unsupported: Optional[str] = "fallback",
        **kwargs: Any,
    ):
        owner = type(self).__name__
        check_unit_interval(owner, momentum=defaults["momentum"])
        if "direction" in defaults and defaults["direction"] not in self._directions:
            raise ValueError(f"{owner}: direction must be one of {self._directions}, got {defaults['direction']!r}")
        if unsupported is not None:
            if unsupported not in UNSUPPORTED:
                raise ValueError(f"{owner}: unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
            defaults = dict(defaults, unsupported=unsupported)
        check_schedule(defaults.get("ns_schedule", "jordan"), defaults.get("ns_steps", 5))
        defaults = dict(defaults, weight_decay=0.0)
        # Where each group came from (see _route), the matrices that fit the set, and those that did not.
        self._sources: list[tuple[int, list[int], bool]] = []
        self._supported, self._unfit = 0, []
        super().__init__(params, defaults, **kwargs)
        if self._supported == 0:
            detail = "; ".join(self._unfit[:4]) + ("; ..." if len(self._unfit) > 4 else "")
            raise ValueError(f"{owner}: no matrix parameter fits the manifold, so nothing would be constrained "
                             f"({detail or 'there are no matrix parameters'})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Routed as at construction (matrices the set cannot hold go to a ``<name>_fallback`` group),
        and the new matrices moved onto their set, as the constructor moves the first ones."""
        start = len(self.param_groups)
        super().add_param_group(param_group)
        for index in range(start, len(self.param_groups)):
            self._project_group(index)

    # -- hooks ----------------------------------------------------------------------------
    @staticmethod
    def geometry(group: dict[str, Any]) -> geo.Geometry:
        """The constraint set of a matrix group, from its hyperparameters."""
        raise NotImplementedError

    def _direction(self, group: dict[str, Any], geometry: geo.Geometry, X: torch.Tensor, G: torch.Tensor,
                   state: dict) -> torch.Tensor:
        """Riemannian gradient of ``G`` at ``X``, optionally ``P_T(msign(·))``."""
        D = geometry.riemannian_gradient(X, G)
        if group["direction"] == "msign":
            D = geometry.tangent(X, msign(D, group["ns_steps"], group["ns_schedule"]))
        return D

    def _step_size(self, group: dict[str, Any], geometry: geo.Geometry, p: torch.Tensor) -> float:
        return group["lr"]

    # -- the skeleton ---------------------------------------------------------------------
    def _route(self, parts: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        """Move each matrix the set cannot hold into a fallback group right after its own (or
        raise, with ``unsupported="error"``); refuse meta tensors. ``self._sources[k]`` says where
        group ``k`` came from: ``(index of the part it was split from, positions there, whether it
        is the fallback part)``, the parts counted over every group added (the layout of
        checkpoints written before unsupported matrices had groups of their own)."""
        owner, out = type(self).__name__, []
        for part in parts:
            source = len({k for k, _, _ in self._sources})
            if not part[MATRIX_KEY]:
                out.append(part)
                self._sources.append((source, list(range(len(part["params"]))), False))
                continue
            settings = {**self.defaults, **part}
            geometry = self.geometry(settings)
            keep, off = [], []
            for i, p in enumerate(part["params"]):
                if p.is_meta:
                    raise ValueError(
                        f"{owner}: {describe_param(part, index, i)} is on the meta device, but the optimizer "
                        "moves every matrix onto its constraint set when it is built and needs its values. "
                        "Materialise and initialise the model first (e.g. model.to_empty(device=...) then its "
                        "reset_parameters()), then build the optimizer."
                    )
                reason = geometry.unsupported_reason(as_matrix(p).shape)
                if reason is None:
                    keep.append(i)
                    continue
                if settings.get("unsupported") == "error":
                    raise ValueError(
                        f"{owner}: {describe_param(part, index, i)} cannot be kept on the manifold ({reason}). "
                        "Pass unsupported='fallback' to train such matrices with the fallback rule, or put "
                        "them in a group with matrix=False."
                    )
                off.append(i)
                self._unfit.append(f"{describe_param(part, index, i)}: {reason}")
            self._supported += len(keep)
            names = part.get("param_names")
            if keep:
                kept = dict(part, params=[part["params"][i] for i in keep])
                if names:
                    kept["param_names"] = [names[i] for i in keep]
                out.append(kept)
                self._sources.append((source, keep, False))
            if off:
                fallback = {"params": [part["params"][i] for i in off], "name": f"{part.get('name', 'matrix')}_fallback",
                            MATRIX_KEY: False}
                if names:
                    fallback["param_names"] = [names[i] for i in off]
                out.append(fallback)
                self._sources.append((source, off, True))
            if not keep and not off:
                out.append(part)
                self._sources.append((source, [], False))
        return out

    @torch.no_grad()
    def _project_group(self, index: int) -> None:
        """Start on the set (when a group is added), unless already there (see
        :data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL`)."""
        group = self.param_groups[index]
        if not group[MATRIX_KEY]:
            return
        geometry = self.geometry(group)
        for i, param in enumerate(group["params"]):
            if param.numel() == 0:  # a 0 × n matrix: nothing to move
                continue
            with whole(self.state, param) as p:  # a DTensor shard: its full matrix
                W = as_matrix(p).float()
                X = geometry.view(W)
                if not geometry.contains(X, ON_CONSTRAINT_TOL):
                    try:
                        X = geometry.project(X, self.state[p])
                    except ValueError as error:
                        raise ValueError(f"{type(self).__name__}: {self.param_name(index, i)}: {error}") from None
                    p.copy_(geometry.unview(X, W.shape).view_as(p))

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        geometry = self.geometry(group)
        batches: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            state = self.state[p]
            G = as_matrix(ema_momentum(state, p.grad, group["momentum"], group["nesterov"])).float()
            if self._scale_free_direction:
                G = power_of_two_scaled(G)
            key = self._batch_key(group, geometry, p, state)
            batches.setdefault(id(p) if key is None else key, []).append((p, G))
        for items in batches.values():
            if len(items) == 1:
                p, G = items[0]
                state = self.state[p]
                W = as_matrix(p).float()
                X = geometry.view(W)
                D = self._direction(group, geometry, X, geometry.view(G), state)
                X = geometry.retract(X, D, self._step_size(group, geometry, p), state)
                p.copy_(geometry.unview(X, W.shape).view_as(p))
            else:
                self._batched_step(group, geometry, items)

    def _batch_key(self, group: dict[str, Any], geometry: geo.Geometry, p: torch.Tensor, state: dict) -> Any:
        """Matrices with equal keys are stepped together as one stack; ``None``: alone. The
        default batches wherever the geometry takes stacks (on a CPU only matrices below
        :data:`CPU_BATCH_MAX_COST`): by shape, dtype, device and the plain values and tensor
        shapes of the state (all but :attr:`_per_matrix_values`), so
        that every choice a direction makes from its state's plain values is the same across
        a stack."""
        if not geometry.batched or (p.device.type == "cpu" and msign_cost(p) >= CPU_BATCH_MAX_COST):
            return None
        skip = (*self._per_matrix_values, "inner_iterations")
        layout = tuple(sorted((k, tuple(v.shape) if isinstance(v, torch.Tensor) else v)
                              for k, v in state.items() if k not in skip))
        return tuple(p.shape), p.dtype, p.device, layout

    # The binding's direction depends on the gradient's direction only (it normalises ``G`` itself):
    # ``G`` is then divided by a power of two near its largest entry first, exactly, so that a
    # finite gradient as large as 1e30 does not overflow the norms and Gram matrices the direction forms.
    _scale_free_direction = False

    # Plain float state values that differ from matrix to matrix: a batched step stacks them into
    # a tensor, and writes them back as floats, rather than splitting the batch by their value.
    _per_matrix_values: tuple[str, ...] = ()

    def _batched_step(self, group: dict[str, Any], geometry: geo.Geometry,
                      items: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The step of same-shaped matrices as one stack: ``W``, ``G`` and every state tensor
        stacked along a new first dimension, the binding's direction and the geometry's
        retraction run once on the stack, then weights and state written back per matrix with
        the keys, shapes and types a step of each matrix alone leaves (plain values that came
        back as a tensor over the stack, and per-matrix flags, as Python numbers: one host
        sync per such key)."""
        params = [p for p, _ in items]
        states = [self.state[p] for p in params]
        W = torch.stack([as_matrix(p).float() for p in params])
        G = torch.stack([G for _, G in items])
        plain = {key for key, value in states[0].items() if not isinstance(value, torch.Tensor)}
        stacked: dict[str, Any] = {}
        for key, value in states[0].items():
            if isinstance(value, torch.Tensor):
                stacked[key] = torch.stack([st[key] for st in states])
            elif key in self._per_matrix_values:
                stacked[key] = torch.tensor([float(st[key]) for st in states], dtype=G.dtype, device=G.device)
            else:
                stacked[key] = value
        versions = {key: (value, value._version) for key, value in stacked.items() if isinstance(value, torch.Tensor)}
        D = self._direction(group, geometry, W, G, stacked)
        X = geometry.retract(W, D, self._step_size(group, geometry, params[0]), stacked)
        for i, p in enumerate(params):
            p.copy_(X[i].view_as(p))

        def untouched(key: str, value: Any) -> bool:
            """A stack neither replaced nor written to in place (e.g. the momentum): no write-back."""
            return key in versions and versions[key][0] is value and versions[key][1] == value._version

        per_matrix = {key: value for key, value in stacked.items()
                      if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == len(states)
                      and not untouched(key, value)}
        values = {key: value.tolist() for key, value in per_matrix.items()
                  if key in plain or value.dtype == torch.bool}
        for i, state in enumerate(states):
            for key in [k for k in state if k not in stacked]:
                del state[key]
            for key, value in stacked.items():
                if untouched(key, value):
                    continue
                if key in values:
                    state[key] = values[key][i]
                elif key in per_matrix:
                    _write(state, key, value[i])
                else:
                    state[key] = value

    @torch.no_grad()
    def _constraint_distance(self, group, p, state) -> Optional[float]:
        if p.numel() == 0:
            return None
        geometry = self.geometry(group)
        return geometry.distance(geometry.view(as_matrix(p).float()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(dict(state_dict, param_groups=self.upgrade_param_groups(state_dict["param_groups"])))

    def upgrade_param_groups(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A checkpoint's ``param_groups`` in this optimizer's layout. Checkpoints written before
        unsupported matrices had a group of their own (they sat in their matrix group, with the
        fallback's hyperparameters under ``fallback_rule``) are split the way this optimizer was;
        others are returned as they are."""
        original = len({index for index, _, _ in self._sources})
        if len(saved) == original != len(self.param_groups):
            return [self._split_saved(saved, k) for k in range(len(self._sources))]
        return saved

    def _split_saved(self, saved: list[dict[str, Any]], k: int) -> dict[str, Any]:
        """Group ``k`` of this optimizer, cut out of the old layout's groups ``saved``."""
        index, positions, is_fallback = self._sources[k]
        old = saved[index]
        if is_fallback:
            group = {key: v for key, v in self.param_groups[k].items() if key not in ("params", "param_names")}
            group.update(old.get("fallback_rule", {}))
        else:
            group = {key: v for key, v in old.items() if key != "fallback_rule"}
        group["params"] = [old["params"][i] for i in positions]
        if "param_names" in old:
            group["param_names"] = [old["param_names"][i] for i in positions]
        return group


def power_of_two_scaled(G: torch.Tensor) -> torch.Tensor:
    """``G / 2^⌊log₂ max(1, max|G|)⌋``: exact (a power of two), a no-op for entries at most 1 in size,
    and at most 1 in size after; no host sync."""
    largest = G.abs().amax().clamp_min(1.0) if G.numel() else G.new_ones(())
    return G / torch.exp2(torch.floor(torch.log2(largest)))


def _write(state: dict, key: str, value: torch.Tensor) -> None:
    """``state[key] = value`` in place where the shape allows, else as a copy: a view into the
    stack would keep the whole stack alive (and be saved whole in a checkpoint)."""
    old = state.get(key)
    if isinstance(old, torch.Tensor) and old._base is None and old.shape == value.shape and old.dtype == value.dtype:
        old.copy_(value)
    else:
        state[key] = value.clone()


def _check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_orientation(owner: str, name: str, value: str) -> None:
    if value not in geo.ORIENTATIONS:
        raise ValueError(f"{owner}: {name} must be one of {geo.ORIENTATIONS}, got {value!r}")


# -- Riemannian / msign steps ------------------------------------------------------------------------
class Oblique(GeometricOptimizer):
    """The oblique manifold: every column of ``W`` (``out × in``; ``dim="rows"``: every row) on
    the sphere of radius ``radius`` (:class:`~lightning_spectral.optim.geometry.Oblique`).
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
    matrices (:class:`~lightning_spectral.optim.geometry.SpecialLinear`); other shapes take the
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
    matrices of even size (:class:`~lightning_spectral.optim.geometry.SymplecticGroup`); other
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
    own Stiefel manifold (:class:`~lightning_spectral.optim.geometry.StiefelBlocks`). It takes
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
    ``Rⁿ``, represented by an orthonormal basis (:class:`~lightning_spectral.optim.geometry.Grassmann`):
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
    for permutation learning (:class:`~lightning_spectral.optim.geometry.Birkhoff`); other shapes,
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
