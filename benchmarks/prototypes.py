"""Prototype fixes measured by section 1, kept out of the package (not used by it).

``ManifoldMuon``'s retraction is ``msign(W − lr·Φ, 8, "polar_express")``: eight Newton–Schulz
steps after a Frobenius normalisation, which throws away what is known about the input. For a
tangent ``Φ`` (``WᵀΦ + ΦᵀW = 0``) and ``W`` on the manifold, ``(W − lrΦ)ᵀ(W − lrΦ) = I + lr²ΦᵀΦ``,
so every singular value of ``W − lrΦ`` lies in ``[1, √(1 + lr²‖Φ‖₂²)]``, already next to 1. Without
the normalisation, the fixed-point quintic ``p(σ) = (15σ − 10σ³ + 3σ⁵)/8`` (the last Polar-Express
triple; ``p(1 + e) = 1 + 2.5e³ + O(e⁴)``, monotone) takes ``e = 0.005`` (lr = 0.1) to ``3e-7`` in
one step and ``e = 0.12`` (lr = 0.5) to ``2e-7`` in two. :func:`polar_retract` does that;
:class:`ManifoldMuonFastRetraction` is ``ManifoldMuon`` with it (``_retract`` overridden).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_spectral.optim import ManifoldMuon
from lightning_spectral.optim.msign import _quintic_step


def polar_retract(Y: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Polar factor of a ``Y`` whose singular values are already near 1 (no normalisation):
    ``steps`` fixed-point quintic steps on the short side."""
    X = Y.mT if Y.size(-2) > Y.size(-1) else Y
    for _ in range(steps):
        X = _quintic_step(X, 1.875, -1.25, 0.375)
    return X.mT if Y.size(-2) > Y.size(-1) else X


class ManifoldMuonFastRetraction(ManifoldMuon):
    """``ManifoldMuon`` whose retraction is :func:`polar_retract` (``retraction_steps`` steps)."""

    def _retract(self, group: dict[str, Any], Y: torch.Tensor) -> torch.Tensor:
        return polar_retract(Y, group["retraction_steps"])


def spectral_module_throttled_lr():
    """``SpectralModule`` whose ``training_step`` logs the learning rates only on the steps a logger
    would write them (every ``trainer.log_every_n_steps``, and only with a logger). Each
    ``self.log`` costs ≈1 ms on CPU in Lightning 2.6 (``_ResultCollection.log`` calls
    ``_ResultMetric.to(device)``, an ``apply_to_collection`` over the metric's ``__dict__``, on
    every call), and the module makes four per step, two of them for the two groups' lr."""
    from lightning_spectral.module import SpectralModule

    class ThrottledLR(SpectralModule):
        def _log_learning_rates(self, optimizer, batch_size):
            trainer = self.trainer
            if trainer.loggers and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                super()._log_learning_rates(optimizer, batch_size)

    return ThrottledLR
