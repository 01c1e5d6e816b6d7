"""The skeleton of every constrained optimizer (:class:`GeometricOptimizer`): momentum →
direction → retraction on the constraint set of each matrix group, same-shaped matrices stepped
as one stack where the geometry takes stacks (see the package docstring, :mod:`..constrained`)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..base import check_unit_interval, ema_momentum
from ..linalg import as_matrix, msign_cost
from ..msign import check_schedule, msign
from . import geometry as geo
from .groups import UNSUPPORTED, ConstrainedGroups

__all__ = ["GeometricOptimizer"]

DIRECTIONS = ("riemannian", "msign")
CPU_BATCH_MAX_COST = 256**3
"""On a CPU, same-shaped matrices are stacked only when ``m·n·min(m, n)`` is below this: a CPU
runs one large GEMM as fast as a batch of them, and stacking and writing back the state then
cost more than the per-call overhead they save (measured, one thread, stacks of 3–16:
ManifoldMuon amortized 0.8× the per-matrix time at 64 × 64, 0.85× at 128 × 128, 1.15× at
256 × 256; SpectralBall amortized 0.25–0.95×). GPUs always stack (one kernel per stack)."""


class GeometricOptimizer(ConstrainedGroups):
    """The skeleton: momentum → direction → retraction on the geometry of each matrix group.

    A binding implements :meth:`geometry` (the set, from the group's hyperparameters; which
    matrices it holds and where the others go: :class:`~.groups.ConstrainedGroups`) and, when
    its rule is not the Riemannian/msign one, :meth:`_direction`; optionally :meth:`_step_size`
    and :meth:`_state_shapes`.

    Common arguments:
        lr: step size (``direction="msign"``: spectral norm of the step before retraction).
        momentum, nesterov: EMA momentum on the Euclidean gradient, projected at the current
            point every step.
        direction: ``"msign"`` or ``"riemannian"`` (see the package docstring, :mod:`..constrained`).
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
        super().__init__(params, defaults, **kwargs)

    # -- hooks ----------------------------------------------------------------------------
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
