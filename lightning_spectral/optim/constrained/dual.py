"""Spectral-norm steepest descent on a manifold (Bernstein 2025, "Modular manifolds"): manifold
Muon on the Stiefel manifold and the spectral sphere / ball, two bindings of the constrained
skeleton :class:`~lightning_spectral.optim.constrained.skeleton.GeometricOptimizer` whose direction is the
steepest unit-spectral-norm move within the tangent space, found through its convex dual
(:mod:`.directions`). ``mode="inner"`` solves the dual to a tolerance every step;
``mode="amortized"`` takes one dual step per training step from the multiplier kept in the
parameter's state (``dual``, plus the Stiefel direction's Anderson memory).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..base import check_mode, check_positive, check_unit_interval, lr_scale, record_inner
from ..linalg import as_matrix, matvec, top_singular_pair
from ..param_groups import MATRIX_KEY
from . import geometry as geo
from .directions import spectral_ball_direction, stiefel_amortized, stiefel_direction
from .skeleton import GeometricOptimizer

__all__ = ["ManifoldMuon", "SpectralBall"]


class ManifoldMuon(GeometricOptimizer):
    """Manifold Muon: each matrix kept on the Stiefel manifold (orthonormal columns if tall,
    orthonormal rows if wide; a conv kernel as ``out × in·kh·kw``).

    ``Φ = msign(G + W X)`` with the symmetric multiplier ``X`` making ``Φ`` tangent
    (``WᵀΦ + ΦᵀW = 0``): :func:`~lightning_spectral.optim.constrained.directions.stiefel_direction`, the
    steepest direction under the spectral norm within the tangent space. Retraction
    ``W ← polar(W − lr·s·Φ)`` (:class:`~lightning_spectral.optim.constrained.geometry.Stiefel`).
    ``mode="inner"`` solves the direction's dual to a tolerance every step; ``"amortized"``
    takes ``dual_steps`` fixed-point steps of the dual per training step
    (:func:`~lightning_spectral.optim.constrained.directions.stiefel_amortized`), warm-started from the
    multiplier kept in the state (``dual``): exact at once on square matrices, and converging
    on tall and near-square ones when the gradient changes slowly.

    Args:
        lr: step size (the spectral norm of the step before retraction, times ``s``).
        momentum, nesterov: EMA momentum on the gradient (0: none).
        mode: ``"inner"`` or ``"amortized"``.
        dual_steps: amortized mode's fixed-point steps of the dual per training step (one
            ``k × k`` eigensolve each).
        dual_memory: amortized mode's Anderson memory (past steps kept in the state: about
            ``(2·dual_memory + 2)·k²`` numbers per ``n × k`` matrix; ``0`` keeps only ``dual``
            and still converges when ``n ≥ 4k``).
        dual_lr, ns_steps, ns_schedule: no effect (the fixed-point dual step has no step size
            and evaluates no msign); kept so that configs and checkpoints of earlier versions,
            whose amortized step was ``X ← X − dual_lr·∇`` with an msign direction, still load.
        inner_tol, inner_max_iters: inner mode's tangency tolerance and evaluation cap.
        retraction_tol: the retraction's bound on ``max |σᵢ(W) − 1|`` after each step.
        adjust_lr: per-shape step scale ``s`` (:func:`~lightning_spectral.optim.base.lr_scale`).
        **kwargs: the fallback arguments and ``check_finite`` of
            :class:`~lightning_spectral.optim.base.MatrixOptimizer` (the auxiliary AdamW).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.0,
        nesterov: bool = False,
        mode: str = "amortized",
        dual_lr: float = 0.1,
        inner_tol: float = 1e-5,
        inner_max_iters: int = 300,
        ns_steps: int = 5,
        ns_schedule: str = "polar_express_5",
        retraction_tol: float = 1e-6,
        adjust_lr: str = "none",
        dual_steps: int = 1,
        dual_memory: int = 3,
        **kwargs: Any,
    ):
        check_mode(mode, "ManifoldMuon")
        check_unit_interval("ManifoldMuon", momentum=momentum)
        check_positive("ManifoldMuon", dual_lr=dual_lr, inner_tol=inner_tol, retraction_tol=retraction_tol)
        for name, value, minimum in (("dual_steps", dual_steps, 1), ("dual_memory", dual_memory, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"ManifoldMuon: {name} must be an integer >= {minimum}, got {value!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, mode=mode, dual_lr=dual_lr,
                        inner_tol=inner_tol, inner_max_iters=int(inner_max_iters), ns_steps=ns_steps,
                        ns_schedule=ns_schedule, retraction_tol=retraction_tol, adjust_lr=adjust_lr,
                        dual_steps=dual_steps, dual_memory=dual_memory)
        super().__init__(params, defaults, unsupported=None, **kwargs)

    _scale_free_direction = True  # msign(Ĝ + WX) with Ĝ = G/‖G‖₂, the dual in Ĝ's units

    @staticmethod
    def geometry(group):
        # ‖Φ‖₂ ≤ √2: Φ's parts in and orthogonal to the span of W are each at most 1 (M S⁻¹ is a contraction).
        return geo.Stiefel(retraction_tol=group["retraction_tol"], direction_norm=2.0)

    def _direction(self, group, geometry, X, G, state):
        if group["mode"] == "amortized":
            # (Checkpoints from before these options existed get this optimizer's values on load.)
            Phi, info = stiefel_amortized(X, G, state, steps=group["dual_steps"], memory=group["dual_memory"])
        else:
            Phi, state["dual"], info = stiefel_direction(X, G, state.get("dual"), mode="inner",
                                                         max_iters=group["inner_max_iters"], tol=group["inner_tol"])
        record_inner(state, info.iterations, info.residual)
        return Phi

    def _batch_key(self, group, geometry, p, state):
        # The inner mode's dual solve is one matrix at a time; the amortized step takes stacks.
        return super()._batch_key(group, geometry, p, state) if group["mode"] == "amortized" else None

    def _step_size(self, group, geometry, p):
        return group["lr"] * lr_scale(p.shape, group["adjust_lr"])

    def _state_shapes(self, group, p):
        shapes = super()._state_shapes(group, p)
        if group[MATRIX_KEY]:
            k = min(as_matrix(p).shape)
            shapes["dual"] = (k, k)
        return shapes


class SpectralBall(GeometricOptimizer):
    """Spectral sphere ``‖W‖₂ = R`` (``constraint="sphere"``) or ball ``‖W‖₂ ≤ R`` (``"ball"``)
    (:class:`~lightning_spectral.optim.constrained.geometry.SpectralSphere`).

    ``Θ = u₁v₁ᵀ`` (top singular pair of ``W``, kept in state from the last retraction),
    ``Φ = msign(G + λΘ)`` with ``λ`` the root of ``⟨Θ, Φ⟩ = 0`` (sphere; ball: ``λ ≥ 0`` and only
    on the boundary; :func:`~lightning_spectral.optim.constrained.directions.spectral_ball_direction`), step
    ``W − lr·R·Φ`` (so ``lr`` is the step relative to the radius), retraction by scaling with
    the tracked ``σ₁``.

    Radius: ``radius_mode="spectral_mup"`` ``R = radius_scale·√(out/in)`` on the parameter's own
    ``out × in`` shape, or ``"identity"`` ``R = radius_scale``.

    Args:
        lr, momentum, nesterov, mode: as :class:`ManifoldMuon`.
        ns_steps, ns_schedule: msign of each direction evaluation; ``None`` picks by mode:
            ``amortized`` 5 Polar-Express steps (as :class:`ManifoldMuon`), ``inner`` 8 (the root
            of ``⟨Θ, msign(G + λΘ)⟩`` is only as accurate as msign: 8 steps reach 4e-7 on
            singular values ≥ 1e-2 of ``‖·‖₂``, 5 steps 0.14).
        dual_lr: amortized ``λ ← λ − dual_lr·⟨Θ, Φ⟩`` (normalised-gradient units).
        inner_tol, inner_max_iters: inner root finding: ``|⟨Θ, Φ⟩| ≤ inner_tol``, evaluation cap.
        sigma_tol: relative accuracy of ``σ₁`` where it is found afresh (the first step's weights,
            a state without the top pair); every later retraction tracks the pair by a fixed
            number of float32 Lanczos steps from the last one, without a host sync
            (:class:`~lightning_spectral.optim.constrained.geometry.SpectralSphere`).
        multiplier: ``False`` sets ``λ = 0``: Muon's direction ``msign(G)``, retracted to the sphere
            (MuonSphere, the λ = 0 ablation of the spectral-sphere optimizer), the control for the dual.
        **kwargs: as :class:`ManifoldMuon`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.0,
        nesterov: bool = False,
        constraint: str = "sphere",
        radius_mode: str = "spectral_mup",
        radius_scale: float = 1.0,
        mode: str = "amortized",
        dual_lr: float = 0.1,
        inner_tol: float = 1e-4,
        inner_max_iters: int = 50,
        ns_steps: Optional[int] = None,
        ns_schedule: Optional[str] = None,
        sigma_tol: float = 1e-6,
        multiplier: bool = True,
        **kwargs: Any,
    ):
        check_mode(mode, "SpectralBall")
        if constraint not in ("sphere", "ball"):
            raise ValueError(f"SpectralBall: constraint must be 'sphere' or 'ball', got {constraint!r}")
        if radius_mode not in geo.RADIUS_MODES:
            raise ValueError(f"SpectralBall: radius_mode must be 'spectral_mup' or 'identity', got {radius_mode!r}")
        check_unit_interval("SpectralBall", momentum=momentum)
        check_positive("SpectralBall", radius_scale=radius_scale, dual_lr=dual_lr, inner_tol=inner_tol,
                       sigma_tol=sigma_tol)
        default_steps, default_schedule = (5, "polar_express_5") if mode == "amortized" else (8, "polar_express")
        ns_steps = default_steps if ns_steps is None else ns_steps
        ns_schedule = default_schedule if ns_schedule is None else ns_schedule
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, constraint=constraint,
                        radius_mode=radius_mode, radius_scale=radius_scale, mode=mode, dual_lr=dual_lr,
                        inner_tol=inner_tol, inner_max_iters=int(inner_max_iters), ns_steps=ns_steps,
                        ns_schedule=ns_schedule, sigma_tol=sigma_tol, multiplier=bool(multiplier))
        super().__init__(params, defaults, unsupported=None, **kwargs)

    _scale_free_direction = True  # msign(Ĝ + λΘ) with Ĝ = G/‖G‖₂, λ in Ĝ's units

    @staticmethod
    def geometry(group):
        return geo.SpectralSphere(radius_mode=group["radius_mode"], radius_scale=group["radius_scale"],
                                  ball=group["constraint"] == "ball", sigma_tol=group["sigma_tol"])

    @staticmethod
    def radius(group: dict[str, Any], p: torch.Tensor) -> float:
        return SpectralBall.geometry(group).radius(as_matrix(p).shape)

    def _whole_step(self, group, W, M, states):
        # The top singular pair of each matrix is found at its first step, not when the optimizer
        # is built: an optimizer whose state is empty until it steps is what torch's distributed
        # checkpoint expects (it reads a non-empty state as initialised and then creates no state
        # for the fallback parameters before loading). The weights are on the sphere since then.
        for i, state in enumerate(states):
            if "u" not in state:
                _, u, v = top_singular_pair(self.geometry(group).view(W[i].float()))
                state.update(u=u.clone(), v=v.clone(), dual=0.0)  # not views of the SVD's factors (saved whole)
            # λ: a 0-d tensor in the amortized mode (never read back to the host), a float in the
            # inner mode's root finding (which reads it); a checkpoint of either mode loads in both.
            lam = state["dual"]
            if group["mode"] == "amortized" and not isinstance(lam, torch.Tensor):
                state["dual"] = torch.tensor(float(lam), device=M.device)
            elif group["mode"] == "inner" and isinstance(lam, torch.Tensor):
                state["dual"] = float(lam)
        return super()._whole_step(group, W, M, states)

    # λ of the inner mode is a float per matrix in the state; a stack carries the stack's λ as one tensor.
    _per_matrix_values = ("dual",)

    def _batch_key(self, group, geometry, p, state):
        # The inner mode's root finding is one matrix at a time; the amortized step takes stacks.
        return super()._batch_key(group, geometry, p, state) if group["mode"] == "amortized" else None

    def _direction(self, group, geometry, X, G, state):
        u, v = state["u"], state["v"]
        constraint, boundary = group["constraint"], None
        if not group.get("multiplier", True):
            constraint = "none"  # λ = 0: msign(G), then the retraction
        elif constraint == "ball":
            # On the boundary (to 1e-3) the ball's multiplier is active, strictly inside it is 0.
            boundary = (u * matvec(X, v)).sum(-1) >= geometry.radius(X.shape[-2:]) * (1.0 - 1e-3)
            if group["mode"] == "inner":
                constraint, boundary = ("ball" if bool(boundary) else "none"), None
        Phi, lam, info = spectral_ball_direction(
            G, u, v, state["dual"], constraint=constraint, mode=group["mode"], dual_lr=group["dual_lr"],
            max_iters=group["inner_max_iters"], tol=group["inner_tol"],
            msign_steps=group["ns_steps"], schedule=group["ns_schedule"], boundary=boundary,
        )
        state["dual"] = lam
        record_inner(state, info.iterations, info.residual)
        return Phi

    def _step_size(self, group, geometry, p):
        return group["lr"] * geometry.radius(as_matrix(p).shape)

    def _state_shapes(self, group, p):
        shapes = super()._state_shapes(group, p)
        if group[MATRIX_KEY]:
            shapes["u"], shapes["v"] = (as_matrix(p).shape[0],), (as_matrix(p).shape[1],)
        return shapes
