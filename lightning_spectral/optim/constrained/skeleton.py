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

    # -- the skeleton: the matrix rule in MatrixOptimizer's three parts ---------------------
    # (the momentum elementwise; direction and retraction on the whole matrix, which returns the
    # new weights; the copy elementwise), so that under FSDP2 each matrix is stepped once, on its owner.
    def _pre_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        return ema_momentum(state, grad, group["momentum"], group["nesterov"])

    def _needs_weight(self, group: dict[str, Any]) -> bool:
        return True

    # The whole step's results are the new weights, not an update (see :mod:`..distributed`).
    _result_is_weight = True

    def _whole_step(self, group: dict[str, Any], W: Optional[torch.Tensor], M: torch.Tensor,
                    states: list[dict]) -> torch.Tensor:
        """Direction and retraction of each matrix, same-shaped ones with equal :meth:`_batch_key`
        as one stack; returns the new weights (float32)."""
        geometry = self.geometry(group)
        batches: dict[Any, list[int]] = {}
        Gs = []
        for i, state in enumerate(states):
            G = M[i].float()
            Gs.append(power_of_two_scaled(G) if self._scale_free_direction else G)
            key = self._batch_key(group, geometry, W[i], state)
            batches.setdefault(("alone", i) if key is None else key, []).append(i)
        out = torch.empty(W.shape, dtype=torch.float32, device=W.device)
        for members in batches.values():
            if len(members) == 1:
                i = members[0]
                X = geometry.view(W[i].float())
                D = self._direction(group, geometry, X, geometry.view(Gs[i]), states[i])
                X = geometry.retract(X, D, self._step_size(group, geometry, W[i]), states[i])
                out[i] = geometry.unview(X, W[i].shape)
            else:
                out[members] = self._batched_step(group, geometry, W[members].float(),
                                                  torch.stack([Gs[i] for i in members]), [states[i] for i in members])
        return out

    def _apply_step(self, group: dict[str, Any], p: torch.Tensor, result: torch.Tensor, shape: torch.Size) -> None:
        p.copy_(result.reshape(p.shape))

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

    def _batched_step(self, group: dict[str, Any], geometry: geo.Geometry, W: torch.Tensor, G: torch.Tensor,
                      states: list[dict]) -> torch.Tensor:
        """The step of same-shaped matrices as one stack (``W``, ``G`` and every state tensor
        stacked along a new first dimension): the binding's direction and the geometry's
        retraction run once on the stack, the state written back per matrix with the keys, shapes
        and types a step of each matrix alone leaves (plain values that came back as a tensor over
        the stack, and per-matrix flags, as Python numbers: one host sync per such key). Returns
        the stack of new weights."""
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
        X = geometry.retract(W, D, self._step_size(group, geometry, W[0]), stacked)

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
        return X

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
