"""Muon: orthogonalised momentum (Jordan et al. 2024), with the AdamW fallback in the same object."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch

from .base import LR_ADJUSTMENTS, MatrixOptimizer, check_positive, check_unit_interval, ema_momentum, lr_scale
from .msign import SCHEDULES, check_schedule, msign, resolve_dtype
from .param_groups import MATRIX_KEY

# torch.optim.Muon's ``adjust_lr_fn`` names -> this package's ``adjust_lr`` names; ``"none"`` (no
# scaling) has no torch name, and torch's step scales by 1 for any name it does not know.
TORCH_ADJUST_LR = {"original": "original", "match_rms_adamw": "match_rms_adamw", "spectral_unclamped": "spectral",
                   "none": "none"}


class Muon(MatrixOptimizer):
    """``W ← (1 − lr·wd) W − lr · s(W) · msign(m)``, ``m`` the (Nesterov) EMA momentum.

    A drop-in for ``torch.optim.Muon``: the same arguments, in the same order, with the same
    defaults and meaning (``lr=1e-3``, ``weight_decay=0.1``, ``momentum=0.95``,
    ``nesterov=True``, Jordan's ``ns_coefficients``, ``eps=1e-7``, ``ns_steps=5``,
    ``adjust_lr_fn=None`` = ``"original"``), and the same state key (``momentum_buffer``).
    The differences: the Newton–Schulz iteration runs in float32 on CPUs (``ns_dtype="auto"``;
    bfloat16 on CUDA, where torch always uses bfloat16), in the Gram form where one side is
    ≥ 2× the other (:func:`~.msign.msign`), conv kernels are accepted (viewed as
    ``out × in·k·k``), same-shaped matrices are orthogonalised together in one batched chain,
    and tensors with fewer than two dimensions (which torch refuses) take the AdamW fallback.

    Args:
        params: parameters or groups (see :mod:`.param_groups`); non-matrix tensors go to the
            fallback (AdamW at ``fallback_lr`` by default).
        lr: step size of the matrix rule (a float or a one-element tensor, ``>= 0``).
        weight_decay: decoupled, ``W ← (1 − lr·wd) W`` (the unscaled lr, as torch does).
        momentum: EMA coefficient ``β``: ``m ← β m + (1 − β) g``.
        nesterov: use ``β m + (1 − β) g`` instead of ``m``.
        ns_coefficients: one ``(a, b, c)`` quintic for every step (torch's name), any three
            finite numbers; ``None`` means Jordan's ``(3.4445, −4.7750, 2.0315)``.
        eps: added to ‖G‖_F before the Newton–Schulz normalisation.
        ns_steps: Newton–Schulz steps.
        adjust_lr_fn: torch's name for the per-shape step scale: ``None``/``"original"``
            ``max(1, out/in)^½``, ``"match_rms_adamw"`` ``0.2·max(out, in)^½``,
            ``"spectral_unclamped"`` ``(out/in)^½``.
        ns_schedule: this package's name for the coefficients: a key of
            :data:`~lightning_spectral.optim.msign.SCHEDULES` (per-step schedules such as
            ``"polar_express"``) or ``"svd"`` for the exact polar factor; give this or
            ``ns_coefficients``.
        ns_dtype: ``"auto"``, ``"float32"`` or ``"bfloat16"`` (:func:`~.msign.resolve_dtype`:
            the accuracy each keeps, and which "auto" picks on which device).
        adjust_lr: this package's name for the step scale (``"original"``, ``"match_rms_adamw"``,
            ``"spectral"``, ``"none"``, see :func:`~lightning_spectral.optim.base.lr_scale`); give
            this or ``adjust_lr_fn``.
        **kwargs: the fallback arguments and ``check_finite`` of
            :class:`~lightning_spectral.optim.base.MatrixOptimizer` (the auxiliary AdamW).

    Every group carries both names of each setting, torch's (``ns_coefficients``,
    ``adjust_lr_fn``) and this package's (``ns_schedule``, ``adjust_lr``), reconciled from
    whichever a group dict or a loaded state dict sets (:func:`torch_keys`), so a
    ``torch.optim.Muon`` state dict loads with its settings and ours loads into torch's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
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
        **kwargs: Any,
    ):
        check_positive("Muon", eps=eps)
        check_unit_interval("Muon", momentum=momentum)
        resolve_dtype(ns_dtype, torch.device("cpu"))
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, eps=eps,
                        ns_steps=ns_steps, ns_dtype=ns_dtype)
        given = dict(ns_coefficients=ns_coefficients, ns_schedule=ns_schedule, adjust_lr=adjust_lr)
        if adjust_lr_fn is not None:  # the argument's None is "not given" (a group's None is torch's "original")
            given["adjust_lr_fn"] = adjust_lr_fn
        defaults.update(torch_keys(given))
        defaults.setdefault("ns_schedule", "jordan")
        defaults.setdefault("ns_coefficients", SCHEDULES["jordan"][0])
        defaults.setdefault("adjust_lr", "original")
        defaults.setdefault("adjust_lr_fn", None)
        check_ns_steps(defaults["ns_schedule"], ns_steps)
        super().__init__(params, defaults, **kwargs)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        # torch.optim.Muon's keys and this package's in a group dict (or a loaded state dict) agree.
        group.update(torch_keys(group))
        if "ns_steps" in group or "ns_schedule" in group:
            check_ns_steps(group.get("ns_schedule", self.defaults["ns_schedule"]),
                           group.get("ns_steps", self.defaults["ns_steps"]))

    # The step in the three parts of MatrixOptimizer (the momentum and the update elementwise, msign
    # of the whole matrix), so that under FSDP2 only msign needs whole matrices (:mod:`.distributed`).
    def _pre_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """The matrix msign is taken of: the (Nesterov) EMA momentum."""
        return ema_momentum(state, grad, group["momentum"], group["nesterov"])

    def _whole_step(self, group: dict[str, Any], W: Optional[torch.Tensor], M: torch.Tensor,
                    states: list[dict]) -> torch.Tensor:
        """``msign`` of a stack of same-shaped matrices, in one batched chain (one alone unbatched)."""
        dtype = resolve_dtype(group["ns_dtype"], M.device)
        single = M.shape[0] == 1
        ortho = msign(M[0] if single else M, group["ns_steps"], schedule_of(group), dtype=dtype, eps=group["eps"])
        return ortho[None] if single else ortho

    def _apply_step(self, group: dict[str, Any], p: torch.Tensor, result: torch.Tensor, shape: torch.Size) -> None:
        """``p ← (1 − lr·wd) p − lr·s(shape)·msign(m)`` (``p`` may be a shard, ``result`` the same shard)."""
        decay = 1.0 - group["lr"] * group["weight_decay"]
        if decay != 1.0:
            p.mul_(decay)
        # sub_, not add_(alpha=-step): torch 2.14's inductor fuses add(p, A @ B, alpha=a) into an
        # addmm that drops alpha (measured: a wide matrix's compiled step was -1/lr times eager's).
        p.sub_(result.reshape(p.shape), alpha=group["lr"] * lr_scale(shape, group["adjust_lr"]))


def torch_muon_state_dict(optimizer: Muon) -> dict[str, Any]:
    """``optimizer``'s matrix groups as a ``torch.optim.Muon`` state dict: load it into a
    ``torch.optim.Muon`` built on the same matrices, in the same order, and its steps are this
    optimizer's (up to torch's bfloat16 Newton–Schulz, where this one runs float32 on CPUs). The
    fallback groups are left out (torch.optim.Muon takes no 1-D tensor; their state has
    torch.optim.AdamW's/SGD's keys). ``torch_muon.load_state_dict(muon.state_dict())`` does the
    same for a Muon with matrix groups only.

    Raises:
        ValueError: naming each matrix group or parameter torch.optim.Muon cannot step the same
            way: a per-step ``ns_schedule`` or ``"svd"`` (torch runs one ``(a, b, c)`` triple every
            step), or a tensor that is not 2-D (a conv kernel: torch refuses it).
    """
    saved = optimizer.state_dict()
    problems, groups, keep = [], [], set()
    for index, (group, live) in enumerate(zip(saved["param_groups"], optimizer.param_groups)):
        if not group[MATRIX_KEY]:
            continue
        where = f"param group {group.get('name', index)}"
        if group["ns_coefficients"] is None:
            problems.append(f"{where} has ns_schedule={group['ns_schedule']!r}, which is not one (a, b, c) triple "
                            "for every step")
        for i, p in enumerate(live["params"]):
            if p.ndim != 2:
                problems.append(f"{optimizer.param_name(index, i)} has shape {tuple(p.shape)} (torch.optim.Muon "
                                "takes 2-D tensors only)")
        groups.append({k: v for k, v in group.items() if k in TORCH_MUON_KEYS})
        keep.update(group["params"])
    if problems:
        raise ValueError("torch.optim.Muon cannot continue this Muon: " + "; ".join(problems) + ". Keep training it "
                         "with lightning_spectral.optim.Muon, or build it with an ns_coefficients triple and 2-D "
                         "matrices.")
    return {"state": {k: v for k, v in saved["state"].items() if k in keep}, "param_groups": groups}


# The group keys of torch.optim.Muon (its constructor's arguments after params), and the names of
# the parameters when the optimizer was given named parameters.
TORCH_MUON_KEYS = ("params", "param_names", "lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                   "ns_steps", "adjust_lr_fn")


def schedule_of(group: dict[str, Any]) -> str | tuple[tuple[float, float, float], ...]:
    """What :func:`~lightning_spectral.optim.msign.msign` runs for a group: its schedule's name, or
    its one ``ns_coefficients`` triple when that is not a named schedule."""
    return group["ns_schedule"] or (tuple(group["ns_coefficients"]),)


def check_ns_steps(schedule: Optional[str], steps: int) -> None:
    check_schedule(schedule or "jordan", steps)


def torch_keys(group: dict[str, Any]) -> dict[str, Any]:
    """The two pairs of keys that say the same thing, torch.optim.Muon's and this package's,
    reconciled from those the group sets (a ``None`` counts as unset, except torch's
    ``adjust_lr_fn=None``, its ``"original"``):

    - ``ns_coefficients`` (one ``(a, b, c)`` triple, or ``None`` for a schedule that changes per
      step) and ``ns_schedule`` (a :data:`SCHEDULES` key or ``"svd"``, or ``None`` for a triple
      that is not one of them);
    - ``adjust_lr_fn`` (torch's names, ``"none"`` for no scaling) and ``adjust_lr``.

    Raises:
        ValueError: the two keys of a pair disagree, or one names nothing known.
    """
    out: dict[str, Any] = {}
    coefficients, schedule = group.get("ns_coefficients"), group.get("ns_schedule")
    if coefficients is not None:
        try:
            triple = tuple(float(c) for c in coefficients)
        except (TypeError, ValueError):
            triple = ()
        if len(triple) != 3 or not all(math.isfinite(c) for c in triple):
            raise ValueError(f"Muon: ns_coefficients must be three finite numbers (a, b, c), got {coefficients!r}")
        named = next((name for name, steps in SCHEDULES.items() if steps == (triple,)), None)
        if schedule is not None and schedule != named:
            raise ValueError(f"Muon: ns_coefficients={triple} and ns_schedule={schedule!r} disagree; give one of them")
        out.update(ns_coefficients=triple, ns_schedule=named)
    elif schedule is not None:
        check_schedule(schedule, 1)
        steps = SCHEDULES.get(schedule, ())
        out.update(ns_schedule=schedule, ns_coefficients=steps[0] if len(steps) == 1 else None)
    fn, ours = group.get("adjust_lr_fn"), group.get("adjust_lr")
    if "adjust_lr_fn" in group:
        name = "original" if fn is None else TORCH_ADJUST_LR.get(fn)
        if name is None:
            raise ValueError(
                f"Muon: Adjust learning rate function {fn} is not supported: adjust_lr_fn must be None or one of "
                f"{sorted(TORCH_ADJUST_LR)} (torch.optim.Muon's names); adjust_lr= takes this package's names"
            )
        if ours is not None and ours != name:
            raise ValueError(f"Muon: adjust_lr_fn={fn!r} and adjust_lr={ours!r} disagree; give one of them")
        out.update(adjust_lr=name, adjust_lr_fn=fn)
    elif ours is not None:
        if ours not in LR_ADJUSTMENTS:
            raise ValueError(f"Muon: adjust_lr must be one of {LR_ADJUSTMENTS}, got {ours!r}")
        out.update(adjust_lr=ours, adjust_lr_fn={v: k for k, v in TORCH_ADJUST_LR.items()}[ours])
    return out
