"""Steepest descent under the spectral norm on a manifold (seeds 000 and 003, DESIGN §3):
manifold Muon on the Stiefel manifold and the spectral sphere / ball optimizer.

Both take ``W ← retract(W − lr · s · Φ)`` with ``Φ`` from :mod:`.directions` computed on the
(optionally momentum-averaged) gradient, and project every matrix onto the constraint set when
the optimizer is built (so the model is on the manifold from step 0). ``mode="inner"`` solves
the direction's dual to a tolerance every step; ``mode="amortized"`` takes one dual step per
training step from the multiplier kept in ``self.state[p]`` (seed 003: almost free).
Non-matrix tensors go to the AdamW fallback. Direction and retraction run in float32 whatever
the parameter dtype.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from .base import ON_CONSTRAINT_TOL, MatrixOptimizer, check_positive, check_unit_interval, ema_momentum, lr_scale, record_inner
from .directions import spectral_ball_direction, stiefel_direction
from .linalg import as_matrix, orient, top_singular_pair, top_singular_triple
from .msign import check_schedule, msign_svd, polar_retraction

MODES = ("inner", "amortized")


def _check_mode(owner: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")


class ManifoldMuon(MatrixOptimizer):
    """Manifold Muon: each matrix kept on the Stiefel manifold (orthonormal columns if tall,
    orthonormal rows if wide; a conv kernel as ``out × in·kh·kw``).

    ``Φ = msign(G + W X)`` with the symmetric multiplier ``X`` making ``Φ`` tangent
    (``WᵀΦ + ΦᵀW = 0``); retraction ``W ← polar(W − lr·s·Φ)`` in float32 by
    :func:`~lightning_spectral.optim.msign.polar_retraction` (``W − lr·Φ`` has singular values in
    ``[1, √(1 + lr²‖Φ‖₂²)]`` for tangent ``Φ``: one or two fixed-point steps, not a full msign).

    Args:
        lr: step size (the spectral norm of the step before retraction, times ``s``).
        momentum, nesterov: EMA momentum on the gradient (0: none, as the seed).
        mode: ``"inner"`` or ``"amortized"``.
        dual_lr: amortized dual step on the normalised gradient.
        inner_tol, inner_max_iters: inner mode's tangency tolerance and evaluation cap.
        ns_steps, ns_schedule: msign of the amortized direction (the inner mode uses none):
            five Polar-Express steps, as many as ``Muon``'s; one dual step per training step is
            no more accurate than that, and 8 steps made the whole step 28 % slower on
            ResNet-18's shapes with no gain in training on the digits MLP.
        retraction_tol: the retraction's bound on ``max |σᵢ(W) − 1|`` after each step.
        adjust_lr: per-shape step scale (:func:`~lightning_spectral.optim.base.lr_scale`).
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
        fallback: str = "adamw",
        fallback_lr: Optional[float] = 1e-3,
        fallback_weight_decay: Optional[float] = 0.0,
        check_finite: bool = True,
    ):
        _check_mode("ManifoldMuon", mode)
        check_unit_interval("ManifoldMuon", momentum=momentum)
        check_positive("ManifoldMuon", dual_lr=dual_lr, inner_tol=inner_tol, retraction_tol=retraction_tol)
        check_schedule(ns_schedule, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, mode=mode, dual_lr=dual_lr,
                        inner_tol=inner_tol, inner_max_iters=int(inner_max_iters), ns_steps=ns_steps,
                        ns_schedule=ns_schedule, retraction_tol=retraction_tol, adjust_lr=adjust_lr,
                        weight_decay=0.0)
        super().__init__(params, defaults, fallback=fallback, fallback_lr=fallback_lr,
                         fallback_weight_decay=fallback_weight_decay, check_finite=check_finite)
        self._project_onto_manifold()

    @torch.no_grad()
    def _project_onto_manifold(self) -> None:
        """Start on the manifold: ``W ← U Vᵀ`` (exact polar factor, once), unless ``W`` is there
        already (see :data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL`)."""
        for group in self.param_groups:
            if group["matrix"]:
                for p in group["params"]:
                    if self._constraint_distance(group, p, self.state[p]) > ON_CONSTRAINT_TOL:
                        p.copy_(msign_svd(as_matrix(p).float()).view_as(p))

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            G = as_matrix(ema_momentum(state, p.grad, group["momentum"], group["nesterov"])).float()
            W = as_matrix(p).float()
            Phi, Y, info = stiefel_direction(
                W, G, state.get("dual"), mode=group["mode"], alpha=self._dual_step(group, state),
                max_iters=group["inner_max_iters"], tol=group["inner_tol"],
                msign_steps=group["ns_steps"], schedule=group["ns_schedule"],
            )
            state["dual"] = Y
            if "inner_residual" in state:
                state["previous_residual"] = state["inner_residual"]
            record_inner(state, info.iterations, info.residual)
            step = group["lr"] * lr_scale(p.shape, group["adjust_lr"])
            p.copy_(polar_retraction(W - step * Phi, group["retraction_tol"]).view_as(p))

    @staticmethod
    def _dual_step(group: dict[str, Any], state: dict) -> float:
        """Amortized dual step with a safeguard: halved when the tangency residual rose since the
        last step, regrown by 10 % up to ``dual_lr`` otherwise. (A fixed step oscillates on
        square and near-square matrices, where ``‖G + WX‖_*`` is steep near its minimum.)"""
        if group["mode"] != "amortized" or "previous_residual" not in state:
            return group["dual_lr"]
        rose = float(state["inner_residual"]) > float(state["previous_residual"])
        step = state.get("dual_step", group["dual_lr"])
        state["dual_step"] = step = 0.5 * step if rose else min(group["dual_lr"], 1.1 * step)
        return step

    def _constraint_distance(self, group, p, state) -> Optional[float]:
        """``‖WᵀW − I‖_F / √k`` in tall orientation (``k`` columns)."""
        _, (W,) = orient(as_matrix(p).float())
        k = W.shape[1]
        return float(torch.linalg.matrix_norm(W.mT @ W - torch.eye(k, device=W.device)) / math.sqrt(k))


class SpectralBall(MatrixOptimizer):
    """Spectral sphere ``‖W‖₂ = R`` (``constraint="sphere"``) or ball ``‖W‖₂ ≤ R`` (``"ball"``).

    ``Θ = u₁v₁ᵀ`` (top singular pair of ``W``, kept in state from the last retraction),
    ``Φ = msign(G + λΘ)`` with ``λ`` the root of ``⟨Θ, Φ⟩ = 0`` (sphere;
    ball: ``λ ≥ 0`` and only on the boundary), step ``W − lr·R·Φ`` (so ``lr`` is the step relative
    to the radius), retraction ``W ← (R/σ₁) W`` (sphere) or ``W ← min(1, R/σ₁) W`` (ball) with
    ``σ₁`` to ``sigma_tol`` by warm-started Lanczos
    (:func:`~lightning_spectral.optim.linalg.top_singular_triple`; an SVD cost 1.7× the whole
    msign on ResNet-18's shapes, power iteration stalls on the clustered top of a spectrum
    that msign steps flatten).

    Radius: ``radius_mode="spectral_mup"`` ``R = radius_scale·√(out/in)`` on the parameter's own
    ``out × in`` shape (the seed transposed first and so inverted ``R`` on wide layers), or
    ``"identity"`` ``R = radius_scale``.

    Args:
        lr, momentum, nesterov, mode: as :class:`ManifoldMuon`.
        ns_steps, ns_schedule: msign of each direction evaluation; ``None`` picks by mode:
            ``amortized`` 5 Polar-Express steps (as :class:`ManifoldMuon`), ``inner`` 8 (the root
            of ``⟨Θ, msign(G + λΘ)⟩`` is only as accurate as msign: 8 steps reach 4e-7 on
            singular values ≥ 1e-2 of ``‖·‖₂``, 5 steps 0.14).
        dual_lr: amortized ``λ ← λ − dual_lr·⟨Θ, Φ⟩`` (normalised-gradient units).
        inner_tol, inner_max_iters: inner root finding: ``|⟨Θ, Φ⟩| ≤ inner_tol``, evaluation cap.
        sigma_tol: relative accuracy of ``σ₁`` after each step (the sphere's constraint error).
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
        fallback: str = "adamw",
        fallback_lr: Optional[float] = 1e-3,
        fallback_weight_decay: Optional[float] = 0.0,
        check_finite: bool = True,
    ):
        _check_mode("SpectralBall", mode)
        if constraint not in ("sphere", "ball"):
            raise ValueError(f"SpectralBall: constraint must be 'sphere' or 'ball', got {constraint!r}")
        if radius_mode not in ("spectral_mup", "identity"):
            raise ValueError(f"SpectralBall: radius_mode must be 'spectral_mup' or 'identity', got {radius_mode!r}")
        check_unit_interval("SpectralBall", momentum=momentum)
        check_positive("SpectralBall", radius_scale=radius_scale, dual_lr=dual_lr, inner_tol=inner_tol,
                       sigma_tol=sigma_tol)
        default_steps, default_schedule = (5, "polar_express_5") if mode == "amortized" else (8, "polar_express")
        ns_steps = default_steps if ns_steps is None else ns_steps
        ns_schedule = default_schedule if ns_schedule is None else ns_schedule
        check_schedule(ns_schedule, ns_steps)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, constraint=constraint,
                        radius_mode=radius_mode, radius_scale=radius_scale, mode=mode, dual_lr=dual_lr,
                        inner_tol=inner_tol, inner_max_iters=int(inner_max_iters), ns_steps=ns_steps,
                        ns_schedule=ns_schedule, sigma_tol=sigma_tol, weight_decay=0.0)
        super().__init__(params, defaults, fallback=fallback, fallback_lr=fallback_lr,
                         fallback_weight_decay=fallback_weight_decay, check_finite=check_finite)
        self._project_onto_constraint()

    @staticmethod
    def radius(group: dict[str, Any], p: torch.Tensor) -> float:
        if group["radius_mode"] == "identity":
            return group["radius_scale"]
        return group["radius_scale"] * math.sqrt(p.shape[0] / math.prod(p.shape[1:]))

    def _retract(self, group: dict[str, Any], W: torch.Tensor, sigma: torch.Tensor, R: float) -> torch.Tensor:
        factor = R / sigma
        return W * (factor if group["constraint"] == "sphere" else factor.clamp(max=1.0))

    @torch.no_grad()
    def _project_onto_constraint(self) -> None:
        for group in self.param_groups:
            if not group["matrix"]:
                continue
            for p in group["params"]:
                W = as_matrix(p).float()
                sigma, u, v = top_singular_pair(W)
                R = self.radius(group, p)
                if abs(float(sigma) / R - 1.0) > ON_CONSTRAINT_TOL:  # σ₁ at hand: no second SVD
                    p.copy_(self._retract(group, W, sigma, R).view_as(p))
                self.state[p].update(u=u, v=v, dual=0.0)

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            R = self.radius(group, p)
            G = as_matrix(ema_momentum(state, p.grad, group["momentum"], group["nesterov"])).float()
            W = as_matrix(p).float()
            u, v = state["u"], state["v"]
            sigma = u @ W @ v
            if group["constraint"] == "sphere":
                constraint = "sphere"
            else:
                constraint = "ball" if float(sigma) >= R * (1.0 - 1e-3) else "none"
            Phi, lam, info = spectral_ball_direction(
                G, u, v, state["dual"], constraint=constraint, mode=group["mode"], dual_lr=group["dual_lr"],
                max_iters=group["inner_max_iters"], tol=group["inner_tol"],
                msign_steps=group["ns_steps"], schedule=group["ns_schedule"],
            )
            W_new = W - group["lr"] * R * Phi
            sigma_new, u, v, _ = top_singular_triple(W_new, (u, v), group["sigma_tol"])
            p.copy_(self._retract(group, W_new, sigma_new, R).view_as(p))
            state.update(u=u, v=v, dual=float(lam))
            record_inner(state, info.iterations, info.residual)

    def _constraint_distance(self, group, p, state) -> Optional[float]:
        """``σ₁/R − 1`` (exact σ₁; sphere: 0 on the set; ball: ≤ 0 inside it)."""
        sigma = torch.linalg.matrix_norm(as_matrix(p).float(), ord=2)
        return float(sigma) / self.radius(group, p) - 1.0
