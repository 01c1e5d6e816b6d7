r"""Edge-of-stability thresholds: the sharpness at which an update rule stops being stable on a quadratic.

On :math:`L(\theta) = \tfrac12\lambda\theta^2` a linear rule is stable while the sharpness stays
below its threshold (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at
the edge of stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"):

- gradient descent, step :math:`\eta`: :math:`\lambda < 2/\eta`;
- heavy-ball momentum as ``torch.optim.SGD`` runs it (:math:`v \leftarrow \beta v + (1-d)g`,
  :math:`\theta \leftarrow \theta - \eta v`): the characteristic polynomial
  :math:`z^2 - (1 + \beta - (1-d)\eta\lambda)z + \beta` has both roots inside the unit circle iff
  :math:`\lambda < (2 + 2\beta)/((1-d)\eta)`;
- Nesterov as ``torch.optim.SGD(nesterov=True)`` runs it (:math:`\theta \leftarrow \theta - \eta(g + \beta v)`):
  the state :math:`(\theta_t, \eta v_{t-1})` moves by :math:`\begin{pmatrix}1 - a(1+\beta) & -\beta^2\\ a & \beta\end{pmatrix}`,
  :math:`a = \eta\lambda`, stable (Jury: :math:`|\det| < 1`, :math:`1 + \mathrm{tr} + \det > 0`) iff
  :math:`\lambda < (2 + 2\beta)/((1 + 2\beta)\eta)`;
- coupled L2 weight decay :math:`\mu` (SGD's ``weight_decay``) adds :math:`\mu` to every curvature:
  the threshold on the loss's :math:`\lambda_{\max}` is lower by :math:`\mu`;
- Adam/AdamW (EMA momentum :math:`\beta_1`, preconditioner
  :math:`P = (1-\beta_1^t)\,\mathrm{diag}(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`): the
  *preconditioned* sharpness :math:`\lambda_{\max}(P^{-1}H)` against
  :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` (38/η at :math:`\beta_1 = 0.9`); :math:`2/\eta` on the
  raw :math:`\lambda_{\max}(H)` means nothing for them.

Rules that are not linear in the gradient (Muon's msign, a spectral budget that binds, manifold
retractions) have no such threshold: :func:`stability_rule` returns ``None`` for their groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from lightning_spectral.diagnostics._utils import local
from lightning_spectral.optim.base import MatrixOptimizer
from lightning_spectral.optim.budgeted import BudgetedOptimizer
from lightning_spectral.optim.param_groups import MATRIX_KEY


@dataclass(frozen=True)
class StabilityRule:
    """A group's linear rule: ``kind`` ``"sgd"`` (threshold on λ_max(H)) or ``"adam"`` (on λ_max(P⁻¹H))."""

    kind: Literal["sgd", "adam"]
    threshold: float
    betas: tuple[float, float] = (0.0, 0.0)
    eps: float = 0.0
    amsgrad: bool = False


def sgd_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0,
                  weight_decay: float = 0.0) -> float:
    """The largest stable λ_max of the loss under ``torch.optim.SGD`` (see the module docstring)."""
    beta = momentum
    if nesterov:
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr) - weight_decay
    return (2 + 2 * beta) / ((1 - dampening if beta else 1.0) * lr) - weight_decay


def adam_threshold(lr: float, beta1: float) -> float:
    """The largest stable preconditioned sharpness λ_max(P⁻¹H) of Adam: (2 + 2β₁)/((1 − β₁)η)."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


def stability_rule(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> Optional[StabilityRule]:
    """The linear rule ``group`` follows, with its threshold, or ``None`` (no known threshold, or ``lr <= 0``).

    ``torch.optim.SGD``, ``Adam``, ``AdamW``; a package optimizer's fallback groups (its SGD or
    AdamW); MuonSGD/MuonAdamW matrix groups without a budget (plain SGD/AdamW).
    """
    lr = float(group.get("lr", 0.0))
    if lr <= 0:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return StabilityRule("sgd", sgd_threshold(lr, group["momentum"], group["nesterov"], group["dampening"],
                                                  group["weight_decay"]))
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return _adam(lr, group, group.get("amsgrad", False))
    if not isinstance(optimizer, MatrixOptimizer):
        return None
    if not group[MATRIX_KEY]:  # the fallback rule
        if group["algorithm"] == "adamw":
            return _adam(lr, group, False)
        return StabilityRule("sgd", sgd_threshold(lr, group["fallback_momentum"], group["fallback_nesterov"],
                                                  0.0, group["weight_decay"]))
    if isinstance(optimizer, BudgetedOptimizer) and optimizer.budget(dict(group)) is None:
        if optimizer.base_rule == "adamw":
            return _adam(lr, group, False)
        return StabilityRule("sgd", sgd_threshold(lr, group["momentum"], group["nesterov"], group["dampening"],
                                                  group["weight_decay"]))
    return None


def _adam(lr: float, group: Mapping[str, Any], amsgrad: bool) -> StabilityRule:
    beta1, beta2 = (float(b) for b in group["betas"])
    return StabilityRule("adam", adam_threshold(lr, beta1), (beta1, beta2), float(group["eps"]), bool(amsgrad))


def adam_inverse_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                                rule: StabilityRule) -> Optional[Tensor]:
    r"""The diagonal of :math:`P^{-1}` of the latest Adam step for ``params`` (flat, concatenated; the
    local shards of ``DTensor`` state), or
    ``None`` before the first step: :math:`P = (1-\beta_1^t)(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)`
    from each parameter's ``step`` and ``exp_avg_sq`` (``max_exp_avg_sq`` with AMSGrad)."""
    beta1, beta2 = rule.betas
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "step" not in state:
            return None
        t = float(state["step"])
        v = local(state["max_exp_avg_sq" if rule.amsgrad else "exp_avg_sq"].detach()).float()
        denom = (v / (1 - beta2**t)).sqrt().add(rule.eps).mul(1 - beta1**t)
        parts.append(denom.reciprocal().reshape(-1))
    return torch.cat(parts) if parts else None
