r"""The size of one optimizer step per layer: :math:`\Delta W = W_{t+1} - W_t`, against the weight and the promise.

For a layer's matrix :math:`W \in \mathbb{R}^{m\times n}` (a conv kernel viewed as
:math:`m \times n = C_{out} \times C_{in}k_1k_2`, as the optimizers view it) and the change
:math:`\Delta W` one step made:

- :math:`\|\Delta W\|_2` (warm-started power iteration) and
  :math:`\mathrm{RMS}(\Delta W) = \|\Delta W\|_F/\sqrt{mn}`;
- relative to the weight: :math:`\|\Delta W\|_2/\|W_t\|_2` and
  :math:`\mathrm{RMS}(\Delta W)/\mathrm{RMS}(W_t) = \|\Delta W\|_F/\|W_t\|_F`;
- relative to the promise :math:`\rho` (:func:`promised_update_norm`, the spectral norm the
  optimizer's rule gives or allows the step): :math:`\|\Delta W\|_2/\rho` and
  :math:`\mathrm{RMS}(\Delta W)/(\rho/\sqrt{\max(m, n)})`, the RMS of a full-rank matrix whose
  singular values all equal :math:`\rho` (:math:`\|A\|_F \le \sqrt{\min(m,n)}\,\|A\|_2`). A step
  whose non-zero singular values all equal :math:`\rho` (Muon's exact polar factor) has spectral
  ratio 1 and RMS ratio :math:`\sqrt{\mathrm{rank}\,\Delta W/\min(m, n)}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_spectral.optim.base import lr_scale
from lightning_spectral.optim.budgeted import BudgetedOptimizer
from lightning_spectral.optim.constrained.dual import ManifoldMuon
from lightning_spectral.optim.linalg import as_matrix, power_iteration
from lightning_spectral.optim.muon import TORCH_ADJUST_LR, Muon
from lightning_spectral.optim.param_groups import MATRIX_KEY


def promised_update_norm(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], p: Tensor) -> Optional[float]:
    r"""The spectral norm :math:`\rho` that ``optimizer``'s rule promises for the next step of matrix ``p`` in ``group``.

    - :class:`~lightning_spectral.optim.Muon` and ``torch.optim.Muon``: the step is
      :math:`-\eta\, s\, \mathrm{msign}(M)`, so :math:`\rho = \eta s` with the group's shape scale
      :math:`s` (``adjust_lr``: ``"original"`` :math:`\sqrt{\max(1, m/n)}`, ...). Newton–Schulz
      only approximates msign (Jordan's quintic leaves singular values in about [0.7, 1.2]), and
      decoupled weight decay adds :math:`-\eta\lambda W`, so the ratio is near, not at, 1.
    - :class:`~lightning_spectral.optim.ManifoldMuon`: the tangent step :math:`\eta s` before the
      retraction moves it back to the manifold.
    - :class:`~lightning_spectral.optim.MuonSGD`, :class:`~lightning_spectral.optim.MuonAdamW`: the
      spectral budget :math:`\eta_t`, a bound (ratio :math:`\le 1`, 1 when the constraint binds;
      MuonAdamW's decoupled weight decay is outside it).
    - Anything else, and the fallback groups: ``None`` (no spectral promise: SGD's and AdamW's
      step sizes are per coordinate).
    """
    is_matrix = group.get(MATRIX_KEY, True) and p.ndim >= 2
    if not is_matrix:
        return None
    lr = float(group["lr"])
    if isinstance(optimizer, (Muon, ManifoldMuon)):
        return lr * lr_scale(p.shape, group["adjust_lr"])
    if isinstance(optimizer, torch.optim.Muon):
        return lr * lr_scale(p.shape, TORCH_ADJUST_LR.get(group.get("adjust_lr_fn") or "original", "none"))
    if isinstance(optimizer, BudgetedOptimizer):
        return optimizer.budget(dict(group))
    return None


class UpdateSizeTracker:
    """Per named matrix: :meth:`snapshot` before a step, :meth:`measure` after it (see the module docstring).

    The spectral norms of :math:`W_t` and :math:`\\Delta W` come from warm-started power
    iterations (left vectors kept per name between measurements, and in :meth:`state_dict`;
    each name's first vectors drawn from ``seed + i``) or, with ``method="svd"``, from
    ``torch.linalg.matrix_norm(ord=2)``. A snapshot holds one fp32 copy of each matrix until
    the measurement.
    """

    def __init__(self, method: str = "power", max_iter: int = 20, tol: float = 1e-4, seed: int = 0) -> None:
        self.method = method
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.vectors: dict[str, Tensor] = {}
        self._before: dict[str, tuple[Tensor, Optional[float]]] = {}

    @property
    def pending(self) -> bool:
        return bool(self._before)

    @torch.no_grad()
    def snapshot(self, matrices: Mapping[str, tuple[Tensor, Optional[float]]]) -> None:
        """Keep a copy of each ``name: (weight, promised norm or None)`` before the step."""
        self._before = {name: (as_matrix(w.detach()).float().clone(), rho) for name, (w, rho) in matrices.items()}

    @torch.no_grad()
    def measure(self, matrices: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
        """``{name: {metric: value}}`` for the snapshot's names, from their weights now; clears the snapshot."""
        out: dict[str, dict[str, float]] = {}
        for index, (name, (before, rho)) in enumerate(self._before.items()):
            delta = as_matrix(matrices[name].detach()).float() - before
            m, n = delta.shape
            delta_norm = self._norm(f"{name}/update", delta, self.seed + 2 * index)
            weight_norm = self._norm(f"{name}/weight", before, self.seed + 2 * index + 1)
            delta_fro = float(torch.linalg.vector_norm(delta))
            metrics = {"spectral_norm": delta_norm, "rms": delta_fro / math.sqrt(m * n),
                       "spectral_to_weight": _ratio(delta_norm, weight_norm),
                       "rms_to_weight": _ratio(delta_fro, float(torch.linalg.vector_norm(before)))}
            if rho is not None:
                metrics["spectral_to_promised"] = _ratio(delta_norm, rho)
                metrics["rms_to_promised"] = _ratio(delta_fro / math.sqrt(m * n), rho / math.sqrt(max(m, n)))
            out[name] = metrics
        self._before = {}
        return out

    def _norm(self, key: str, matrix: Tensor, seed: int) -> float:
        if self.method == "svd":
            return float(torch.linalg.matrix_norm(matrix, ord=2))
        u = self.vectors.get(key)
        generator = None
        if u is None or u.shape != matrix.shape[:-1]:
            u, generator = None, torch.Generator().manual_seed(seed)
        sigma, self.vectors[key], _ = power_iteration(matrix, u, self.max_iter, self.tol, generator)
        return float(sigma)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"vectors": {k: v.detach().cpu().clone() for k, v in self.vectors.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.vectors = {k: v.clone() for k, v in state["vectors"].items()}


def _ratio(a: float, b: float) -> float:
    """``a/b``; NaN for a zero ``b`` (never logged: a zero weight or promise has no ratio)."""
    return a / b if b > 0 else math.nan
