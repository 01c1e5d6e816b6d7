"""Muon: orthogonalised momentum (Keller Jordan), with the AdamW fallback in the same object."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional

import torch

from .base import MatrixOptimizer, check_positive, check_unit_interval, ema_momentum, lr_scale
from .linalg import as_matrix
from .msign import check_schedule, msign, resolve_dtype


class Muon(MatrixOptimizer):
    """``W ← (1 − lr·wd) W − lr · s(W) · msign(m)``, ``m`` the (Nesterov) EMA momentum.

    Same-shaped matrices are orthogonalised together through one batched Newton–Schulz chain.
    With the defaults the matrix rule is numerically the update of ``torch.optim.Muon``
    (Jordan's coefficients, 5 steps, ``adjust_lr="original"``) except that the iteration runs in
    float32 on CPUs (``ns_dtype="auto"``; bfloat16 on CUDA) and conv kernels are accepted.

    Args:
        params: parameters or groups (see :mod:`.param_groups`); non-matrix tensors go to the
            fallback (AdamW at ``fallback_lr`` by default).
        lr: step size of the matrix rule.
        momentum: EMA coefficient ``β``.
        nesterov: use ``β m + (1 − β) g`` instead of ``m``.
        weight_decay: decoupled, ``W ← (1 − lr·wd) W`` (the unscaled lr, as torch does).
        ns_steps, ns_schedule: msign's step count and coefficient schedule
            (:data:`~lightning_spectral.optim.msign.SCHEDULES`, or ``"svd"`` for the exact factor).
        ns_dtype: ``"auto"``, ``"float32"`` or ``"bfloat16"``.
        adjust_lr: per-shape step scale, see :func:`~lightning_spectral.optim.base.lr_scale`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_schedule: str = "jordan",
        ns_dtype: str = "auto",
        adjust_lr: str = "original",
        fallback: str = "adamw",
        fallback_lr: Optional[float] = 3e-4,
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-8,
        fallback_momentum: float = 0.9,
        fallback_weight_decay: Optional[float] = None,
        check_finite: bool = True,
    ):
        check_positive("Muon", lr=lr)
        check_unit_interval("Muon", momentum=momentum)
        check_schedule(ns_schedule, ns_steps)
        resolve_dtype(ns_dtype, torch.device("cpu"))
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_schedule=ns_schedule, ns_dtype=ns_dtype, adjust_lr=adjust_lr)
        super().__init__(params, defaults, fallback=fallback, fallback_lr=fallback_lr,
                         fallback_betas=fallback_betas, fallback_eps=fallback_eps,
                         fallback_momentum=fallback_momentum, fallback_weight_decay=fallback_weight_decay,
                         check_finite=check_finite)

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for p in params:
            update = ema_momentum(self.state[p], p.grad, group["momentum"], group["nesterov"])
            matrix = as_matrix(update)
            by_shape[matrix.shape].append((p, matrix))
        lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        for shape, items in by_shape.items():
            stacked = items[0][1] if len(items) == 1 else torch.stack([m for _, m in items])
            dtype = resolve_dtype(group["ns_dtype"], stacked.device)
            ortho = msign(stacked, group["ns_steps"], group["ns_schedule"], dtype=dtype)
            step = -lr * lr_scale(shape, group["adjust_lr"])
            for i, (p, _) in enumerate(items):
                o = ortho if len(items) == 1 else ortho[i]
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(o.view_as(p), alpha=step)
