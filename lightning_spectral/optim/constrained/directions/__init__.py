"""Steepest-descent directions under the spectral norm on a manifold (the amortized ones also for a
stack of same-shaped matrices, each treated as if alone).

Both solve ``max ⟨G, Φ⟩  s.t.  ‖Φ‖₂ ≤ 1,  Φ ∈ T`` (``T`` the tangent space) through the convex
dual, whose gradient is the constraint residual (Bernstein 2025, "Modular manifolds", Thinking
Machines Lab; Bernstein & Newhouse 2024, "Old optimizer, new norm", for ``msign`` as the
steepest direction under ``‖·‖₂``):

- Stiefel (:func:`stiefel_direction`, :func:`stiefel_amortized`): ``Φ = msign(G + W X)``,
  ``X`` symmetric, minimising ``‖G + W X‖_*``; ``∇ = sym(WᵀΦ)``. Square ``W``: the closed
  form :func:`orthogonal_direction`.
- Spectral sphere / ball (:func:`spectral_ball_direction`): ``Φ = msign(G + λΘ)``,
  ``Θ = u₁v₁ᵀ``, ``λ`` minimising ``‖G + λΘ‖_*``; ``∇ = ⟨Θ, Φ⟩``, monotone in ``λ``.

``mode="inner"`` iterates to a tolerance; ``mode="amortized"`` takes one step from the
multiplier kept by the caller (the optimizer's state) and returns the new one. The multipliers
are in units of an estimate of ``‖G‖₂``, so they live on a fixed scale whatever the gradient's
size.

Weak duality is the certificate: for any feasible ``Φ``, ``⟨G, Φ⟩ ≤ ‖G + W X‖_*`` (resp.
``‖G + λΘ‖_*``). With ``certify=True`` the returned direction is made exactly feasible
(projected onto ``T``, rescaled into the unit ball) and the info carries both numbers.
"""

from .common import DirectionInfo
from .spectral_ball import spectral_ball_direction
from .stiefel import orthogonal_direction, stiefel_amortized, stiefel_direction

__all__ = ["DirectionInfo", "orthogonal_direction", "spectral_ball_direction", "stiefel_amortized", "stiefel_direction"]
