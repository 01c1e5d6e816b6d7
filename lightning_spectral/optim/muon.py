"""Muon: orthogonalised momentum (Jordan et al. 2024), with the AdamW fallback in the same object."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

import torch

from .base import MatrixOptimizer, check_positive, check_unit_interval, ema_momentum, lr_scale
from .linalg import as_matrix
from .msign import SCHEDULES, check_schedule, msign, resolve_dtype

# torch.optim.Muon's ``adjust_lr_fn`` names -> this package's ``adjust_lr`` names.
TORCH_ADJUST_LR = {"original": "original", "match_rms_adamw": "match_rms_adamw", "spectral_unclamped": "spectral"}


class Muon(MatrixOptimizer):
    """``W ← (1 − lr·wd) W − lr · s(W) · msign(m)``, ``m`` the (Nesterov) EMA momentum.

    A drop-in for ``torch.optim.Muon``: the same arguments, in the same order, with the same
    defaults and meaning (``lr=1e-3``, ``weight_decay=0.1``, ``momentum=0.95``,
    ``nesterov=True``, Jordan's ``ns_coefficients``, ``eps=1e-7``, ``ns_steps=5``,
    ``adjust_lr_fn=None`` = ``"original"``), and the same state key (``momentum_buffer``).
    The differences: the Newton–Schulz iteration runs in float32 on CPUs (``ns_dtype="auto"``;
    bfloat16 on CUDA, where torch always uses bfloat16), conv kernels are accepted (viewed as
    ``out × in·k·k``), same-shaped matrices are orthogonalised together in one batched chain,
    and tensors with fewer than two dimensions (which torch refuses) take the AdamW fallback.

    Args:
        params: parameters or groups (see :mod:`.param_groups`); non-matrix tensors go to the
            fallback (AdamW at ``fallback_lr`` by default).
        lr: step size of the matrix rule.
        weight_decay: decoupled, ``W ← (1 − lr·wd) W`` (the unscaled lr, as torch does).
        momentum: EMA coefficient ``β``: ``m ← β m + (1 − β) g``.
        nesterov: use ``β m + (1 − β) g`` instead of ``m``.
        ns_coefficients: one ``(a, b, c)`` quintic for every step (torch's name); ``None`` means
            Jordan's ``(3.4445, −4.7750, 2.0315)``. Any other value must be one of the
            constant schedules of :data:`~lightning_spectral.optim.msign.SCHEDULES`.
        eps: added to ‖G‖_F before the Newton–Schulz normalisation.
        ns_steps: Newton–Schulz steps.
        adjust_lr_fn: torch's name for the per-shape step scale: ``None``/``"original"``
            ``max(1, out/in)^½``, ``"match_rms_adamw"`` ``0.2·max(out, in)^½``,
            ``"spectral_unclamped"`` ``(out/in)^½``.
        ns_schedule: this package's name for the coefficients: a key of
            :data:`~lightning_spectral.optim.msign.SCHEDULES` (per-step schedules such as
            ``"polar_express"``) or ``"svd"`` for the exact polar factor; give this or
            ``ns_coefficients``.
        ns_dtype: ``"auto"``, ``"float32"`` or ``"bfloat16"``.
        adjust_lr: this package's name for the step scale (``"original"``, ``"match_rms_adamw"``,
            ``"spectral"``, ``"none"``, see :func:`~lightning_spectral.optim.base.lr_scale`); give
            this or ``adjust_lr_fn``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Optional[Sequence[float]] = None,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
        *,
        ns_schedule: Optional[str] = None,
        ns_dtype: str = "auto",
        adjust_lr: Optional[str] = None,
        fallback: str = "adamw",
        fallback_lr: Optional[float] = 3e-4,
        fallback_betas: tuple[float, float] = (0.9, 0.95),
        fallback_eps: float = 1e-8,
        fallback_momentum: float = 0.9,
        fallback_weight_decay: Optional[float] = None,
        check_finite: bool | str = True,
    ):
        check_positive("Muon", lr=lr, eps=eps)
        check_unit_interval("Muon", momentum=momentum)
        ns_schedule = _schedule_name(ns_coefficients, ns_schedule)
        check_schedule(ns_schedule, ns_steps)
        adjust_lr = _adjust_lr_name(adjust_lr_fn, adjust_lr)
        resolve_dtype(ns_dtype, torch.device("cpu"))
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eps=eps,
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
            ortho = msign(stacked, group["ns_steps"], group["ns_schedule"], dtype=dtype, eps=group["eps"])
            step = -lr * lr_scale(shape, group["adjust_lr"])
            for i, (p, _) in enumerate(items):
                o = ortho if len(items) == 1 else ortho[i]
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(o.view_as(p), alpha=step)


def _schedule_name(ns_coefficients: Optional[Sequence[float]], ns_schedule: Optional[str]) -> str:
    """The :data:`SCHEDULES` key for torch's ``ns_coefficients`` and/or this package's ``ns_schedule``."""
    if ns_coefficients is None:
        return "jordan" if ns_schedule is None else ns_schedule
    try:
        triple = tuple(float(c) for c in ns_coefficients)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise ValueError(f"Muon: ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
    matches = [name for name, steps in SCHEDULES.items() if steps == (triple,)]
    if not matches:
        constant = {name: steps[0] for name, steps in SCHEDULES.items() if len(steps) == 1}
        raise ValueError(
            f"Muon: ns_coefficients={triple} is not a schedule of lightning_spectral.optim.msign.SCHEDULES "
            f"(constant ones: {constant}); pass one of those, or ns_schedule= with a per-step schedule "
            f"name ({sorted(SCHEDULES)})"
        )
    if ns_schedule is not None and ns_schedule not in matches:
        raise ValueError(f"Muon: ns_coefficients={triple} and ns_schedule={ns_schedule!r} disagree; give one of them")
    return matches[0]


def _adjust_lr_name(adjust_lr_fn: Optional[str], adjust_lr: Optional[str]) -> str:
    """This package's ``adjust_lr`` from torch's ``adjust_lr_fn`` and/or ``adjust_lr`` (default ``"original"``)."""
    if adjust_lr_fn is None:
        return "original" if adjust_lr is None else adjust_lr
    if adjust_lr_fn not in TORCH_ADJUST_LR:
        raise ValueError(
            f"Muon: adjust_lr_fn must be None or one of {sorted(TORCH_ADJUST_LR)} (torch.optim.Muon's names), "
            f"got {adjust_lr_fn!r}; adjust_lr= takes this package's names"
        )
    name = TORCH_ADJUST_LR[adjust_lr_fn]
    if adjust_lr is not None and adjust_lr != name:
        raise ValueError(f"Muon: adjust_lr_fn={adjust_lr_fn!r} and adjust_lr={adjust_lr!r} disagree; give one of them")
    return name
