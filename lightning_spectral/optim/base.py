"""The optimizer skeleton every matrix optimizer of this package shares.

One ``torch.optim.Optimizer`` holds two kinds of group (see :mod:`.param_groups`): matrix
groups follow the subclass's matrix rule; the others follow an AdamW or SGD fallback computed
by torch's own functional cores (``torch.optim.adamw.adamw`` / ``torch.optim.sgd.sgd``, same
state keys as ``torch.optim.AdamW``/``SGD``). ``step(closure)`` calls the closure, refuses a
non-finite gradient before touching any weight, then updates every group: one
``optimizer.step()`` per batch updates the whole model.

State is only tensors and plain Python values in ``self.state[p]``, so ``state_dict()`` loads
with ``torch.load(weights_only=True)``.

A matrix rule comes in three parts (:meth:`MatrixOptimizer._pre_step` elementwise,
:meth:`MatrixOptimizer._whole_step` on whole matrices, :meth:`MatrixOptimizer._apply_step`
elementwise). Under ``torch.distributed`` the matrix work is split across the ranks
(:mod:`.distributed`): each matrix's whole step runs on one rank, on plain parameters (DDP) and on
parameters sharded as ``DTensor`` (FSDP2), whose elementwise parts run on their shards. The
fallback steps run on every rank (on the shards of a sharded parameter).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from .constrained.geometry.base import record_inner
from .linalg import as_matrix
from .param_groups import MATRIX_KEY, USE_MUON_KEY, named_group, split_group, warn_misrouted
from .distributed import owner_values, step_matrices, whole_state
from .sharded import is_sharded

__all__ = ["AUX_ADAMW", "FALLBACKS", "FALLBACK_ARGUMENTS", "LR_ADJUSTMENTS", "MODES", "MatrixOptimizer",
           "NonFiniteGradientError", "ON_CONSTRAINT_TOL", "check_group_values", "check_mode", "check_positive",
           "check_unit_interval", "describe_param", "ema_momentum", "fallback_rule", "lr_scale", "record_inner"]


FALLBACKS = ("adamw", "sgd")
# The rule for the parameters outside the matrix rule: the same keywords in every optimizer of the
# package (MatrixOptimizer's docstring says what each means and what ``None`` stands for).
FALLBACK_ARGUMENTS = ("fallback", "fallback_lr", "fallback_betas", "fallback_eps", "fallback_momentum",
                      "fallback_nesterov", "fallback_weight_decay")
# The fallback's values where the optimizer's matrix rule is not itself SGD or AdamW: the auxiliary
# AdamW of Jordan et al.'s MuonWithAuxAdam (github.com/KellerJordan/Muon, muon.py), except eps,
# torch.optim.AdamW's 1e-8; SGD's momentum and Nesterov flag are torch's common choices.
AUX_ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
# A fallback argument's group key (what torch's AdamW/SGD functional cores read from the group).
_FALLBACK_KEYS = {"lr": "lr", "betas": "betas", "eps": "eps", "momentum": "fallback_momentum",
                  "nesterov": "fallback_nesterov", "weight_decay": "weight_decay"}
# Constrained optimizers move their weights onto the constraint set when they are built, except
# weights already within this distance of it: Lightning builds the optimizer *after* restoring a
# checkpoint's weights, and re-projecting those would perturb a resumed run in the last bits.
ON_CONSTRAINT_TOL = 1e-3
LR_ADJUSTMENTS = ("none", "original", "match_rms_adamw", "spectral")
# How a constrained direction's dual is solved: to a tolerance every step ("inner"), or by one dual
# step per training step from the multiplier kept in the state ("amortized").
MODES = ("inner", "amortized")
CHECK_FINITE = (True, False, "lazy")
# The largest lr and weight decay (and their product) a group may hold: float32's largest number, the
# dtype the matrix rules compute their steps in; a larger lr makes every step overflow.
STEP_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf: the step was refused and no weight was changed."""


def finite_flags(tensors: Iterable[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Per device, a 0-d bool tensor on it: every entry of the floating ``tensors`` there is
    finite. One fused reduction per device (``torch._foreach_norm``, then one ``isfinite``) and no
    host sync; a norm that overflows on finite entries (above ~1e19 in float32) reads as not
    finite, which :func:`first_nonfinite` clears."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        t = t.to_local() if is_sharded(t) else t  # this rank's shard
        if t.is_floating_point():
            by_device.setdefault(t.device, []).append(t)
    return {device: torch.stack(torch._foreach_norm(ts)).isfinite().all() for device, ts in by_device.items()}


def first_nonfinite(named: Iterable[tuple[Any, torch.Tensor]]) -> Any:
    """The key of the first floating tensor of ``named`` (``(key, tensor)`` pairs) with a NaN or
    Inf entry, or ``None``: :func:`finite_flags` and one host sync per device; only if a flag is
    false are the tensors checked one by one."""
    named = [(key, t.to_local() if is_sharded(t) else t) for key, t in named]
    if all(bool(flag) for flag in finite_flags(t for _, t in named).values()):
        return None
    return next((key for key, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def fallback_rule(owner: str, base_rule: Optional[str], defaults: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The group keys of the fallback rule from the seven :data:`FALLBACK_ARGUMENTS` (``given``):
    each ``None`` is the optimizer's own value (``defaults``) when the fallback is its
    ``base_rule``, else :data:`AUX_ADAMW`'s; a learning rate or weight decay the fallback shares
    with the optimizer is left out, so its groups take the optimizer's (torch's group defaults)."""
    unknown = set(given) - set(FALLBACK_ARGUMENTS)
    if unknown:
        raise TypeError(f"{owner}: unknown fallback arguments {sorted(unknown)}; they are {FALLBACK_ARGUMENTS}")
    algorithm = given.get("fallback") or base_rule or "adamw"
    if algorithm not in FALLBACKS:
        raise ValueError(f"{owner}: fallback must be one of {FALLBACKS} (or None), got {given.get('fallback')!r}")
    inherit = algorithm == base_rule
    rule: dict[str, Any] = {"algorithm": algorithm}
    for name, key in _FALLBACK_KEYS.items():
        value = given.get(f"fallback_{name}")
        if value is None and inherit and name in defaults:
            if name in ("lr", "weight_decay"):
                continue
            value = defaults[name]
        rule[key] = AUX_ADAMW[name] if value is None else value
    betas = rule["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: fallback_betas must be two numbers (beta1, beta2), got {betas!r}")
    rule["betas"] = tuple(betas)
    check_unit_interval(owner, fallback_beta1=betas[0], fallback_beta2=betas[1],
                        fallback_momentum=rule["fallback_momentum"])
    check_positive(owner, fallback_eps=rule["eps"])
    check_group_values(owner, {k: rule[k] for k in ("lr", "weight_decay") if k in rule}, prefix="fallback_")
    return rule


def check_group_values(owner: str, settings: dict[str, Any], where: str = "", prefix: str = "") -> None:
    """``lr`` (a float or a one-element tensor, as torch allows) and ``weight_decay`` of a group or
    of the defaults: finite and ``>= 0``."""
    for name in ("lr", "weight_decay"):
        if name not in settings:
            continue
        value = settings[name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{owner}{where}: Tensor {prefix}{name} must be 1-element, got shape {tuple(value.shape)}")
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}{where}: {prefix}{name} must be >= 0 and finite, got {settings[name]!r}")
        if value > STEP_MAX:
            raise ValueError(f"{owner}{where}: {prefix}{name}={value:g} is above {STEP_MAX:.3g}, the largest float32: "
                             "a step of that size cannot be represented in the dtype the steps are computed in")
    lr, decay = (float(settings.get(k, 0.0)) for k in ("lr", "weight_decay"))
    if lr * decay > STEP_MAX:
        raise ValueError(f"{owner}{where}: {prefix}lr·weight_decay = {lr * decay:g} overflows float32 (the decay "
                         "multiplies the weights by 1 − lr·weight_decay)")


def _refuse_unsupported(owner: str, group: dict[str, Any], index: int, i: int, p: torch.Tensor) -> None:
    """Parameters no rule of the package takes, named: complex tensors and FSDP1 flat shards."""
    if p.is_complex():
        raise ValueError(
            f"{owner} does not support complex parameters: {describe_param(group, index, i)} is {p.dtype}. The "
            "matrix rules (msign, the constraint sets) are defined for real matrices (torch.optim.Muon refuses them too). "
            "Optimize torch.view_as_real(p) as a real parameter, or give this one to another optimizer."
        )
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(
            f"{owner}: the parameters are FSDP1 flat shards (FullyShardedDataParallel, Lightning's FSDPStrategy), "
            "1-D slices that cut matrices at arbitrary offsets, so no matrix rule can see its matrix. Shard with "
            "FSDP2 instead (torch.distributed.fsdp.fully_shard, Lightning's ModelParallelStrategy), whose DTensor "
            "parameters these optimizers gather, or use DDP."
        )


def check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{owner}: {name} must be a positive finite number, got {value!r}")


def check_unit_interval(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}")


def check_mode(mode: str, owner: Optional[str] = None) -> None:
    if mode not in MODES:
        raise ValueError(f"{owner + ': ' if owner else ''}mode must be one of {MODES}, got {mode!r}")


def describe_param(group: dict[str, Any], group_index: int, i: int) -> str:
    """``parameter 'name'`` or, for unnamed parameters, its position and shape."""
    names = group.get("param_names")
    if names:
        return f"parameter '{names[i]}'"
    return f"parameter #{i} of group {group.get('name', group_index)} (shape {tuple(group['params'][i].shape)})"


def lr_scale(shape: torch.Size, mode: str) -> float:
    """Per-matrix step multiplier for an ``out × in`` matrix (conv kernels flattened):
    ``"original"`` ``max(1, out/in)^½`` (Keller Jordan, ``torch.optim.Muon`` default),
    ``"match_rms_adamw"`` ``0.2·max(out, in)^½`` (Moonlight: AdamW-sized update RMS),
    ``"spectral"`` ``(out/in)^½`` (Bernstein's spectral scaling), ``"none"`` 1."""
    out_dim, in_dim = shape[0], math.prod(shape[1:])
    if mode == "original":
        return max(1.0, out_dim / in_dim) ** 0.5
    if mode == "match_rms_adamw":
        return 0.2 * max(out_dim, in_dim) ** 0.5
    if mode == "spectral":
        return (out_dim / in_dim) ** 0.5
    return 1.0


def ema_momentum(state: dict, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """``m ← β m + (1 − β) g``; returns ``m`` or, with Nesterov, ``β m + (1 − β) g`` (the grad
    itself is not modified). ``β = 0`` returns ``g``."""
    if beta == 0.0:
        return grad
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = torch.zeros_like(grad)
    buf.lerp_(grad, 1.0 - beta)
    return grad.lerp(buf, beta) if nesterov else buf


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: routes groups, runs the fallback, checks gradients, reports constraints.

    Subclasses implement the matrix rule in three parts, :meth:`_pre_step`, :meth:`_whole_step`
    and :meth:`_apply_step` (with :attr:`_elementwise_state`, :meth:`_needs_weight`), or
    :meth:`_matrix_step` itself (then a sharded matrix is stepped whole on every rank); optionally
    :meth:`_constraint_distance`, and :meth:`_state_shapes` for state tensors not shaped like
    their parameter.

    Every group is routed when it is added, at construction or later through
    :meth:`add_param_group` alike (:func:`~lightning_spectral.optim.param_groups.split_group`):
    ``matrix``/``use_muon`` keys decide, else ``ndim``; a ``matrix=False`` group takes the fallback
    rule's keys it does not set itself.

    Fallback arguments (the rule for every non-matrix group; the same seven in every optimizer of
    the package, :data:`FALLBACK_ARGUMENTS`; a group's own keys win). ``None`` means: the
    optimizer's own hyperparameter of that name where the fallback *is* the optimizer's base rule
    (:attr:`base_rule`: MuonSGD's SGD, MuonAdamW's AdamW, so that their fallback is the same rule
    without the budget), else :data:`AUX_ADAMW`, the auxiliary AdamW of Jordan et al.'s
    ``MuonWithAuxAdam`` (lr 3e-4, betas (0.9, 0.95), no weight decay):
        fallback: ``"adamw"`` or ``"sgd"`` (``None``: the base rule, else ``"adamw"``).
        fallback_lr: its learning rate.
        fallback_betas, fallback_eps: AdamW's.
        fallback_momentum, fallback_nesterov: SGD's.
        fallback_weight_decay: its weight decay. A group the user builds without ``weight_decay``
            takes it: 0 for an auxiliary AdamW (biases, norms, embeddings and the head are not
            decayed, as in ``MuonWithAuxAdam``), the optimizer's ``weight_decay`` where the
            fallback is its base rule (as ``torch.optim.SGD``/``AdamW`` treat every group). A
            matrix group without one takes the optimizer's ``weight_decay`` (torch's rule).
        check_finite: what a step whose gradients hold NaN/Inf does.
            ``True`` (default): raise :class:`NonFiniteGradientError` before any weight changes
            (one fused reduction and one host sync per step).
            ``"lazy"``: no host sync. The finite flag is computed on the device, and the step's
            writes are masked by it: after a non-finite step every weight and every state tensor
            holds its value from before the step (the update runs on zeroed gradients and is then
            discarded with ``torch.where``, which costs one transient copy of the weights and
            state tensors; plain state values such as ring positions or iteration counts may
            still move). Skipped steps are counted on the device and surface as a
            :class:`NonFiniteGradientError` (naming how many steps were skipped) at the first of:
            :meth:`raise_if_nonfinite`; :meth:`state_dict` (so no checkpoint is written past a
            skipped step without an error); every :attr:`lazy_check_every`-th ``step()`` (one
            sync there, raised before that step changes anything); reading
            :attr:`nonfinite_steps` gives the count without raising.
            ``False``: no check (NaN/Inf reach the weights).
    """

    # The algorithm the matrix rule is built on, when the fallback can be that same rule ("sgd", "adamw").
    base_rule: Optional[str] = None

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        fallback: Optional[str] = None,
        fallback_lr: Optional[float] = None,
        fallback_betas: Optional[tuple[float, float]] = None,
        fallback_eps: Optional[float] = None,
        fallback_momentum: Optional[float] = None,
        fallback_nesterov: Optional[bool] = None,
        fallback_weight_decay: Optional[float] = None,
        check_finite: bool | str = True,
    ):
        owner = type(self).__name__
        if check_finite not in CHECK_FINITE:
            raise ValueError(f"{owner}: check_finite must be True, False or 'lazy', got {check_finite!r}")
        check_group_values(owner, defaults)
        if "adjust_lr" in defaults and defaults["adjust_lr"] not in LR_ADJUSTMENTS:
            raise ValueError(f"{owner}: adjust_lr must be one of {LR_ADJUSTMENTS}, got {defaults['adjust_lr']!r}")
        self.check_finite = check_finite
        self.fallback_rule = fallback_rule(owner, self.base_rule, defaults, fallback=fallback, fallback_lr=fallback_lr,
                                           fallback_betas=fallback_betas, fallback_eps=fallback_eps,
                                           fallback_momentum=fallback_momentum, fallback_nesterov=fallback_nesterov,
                                           fallback_weight_decay=fallback_weight_decay)
        self._groups_added = 0
        self._split_by_ndim: list[str] = []  # named matrices routed by shape alone (no matrix/use_muon key)
        super().__init__(params, defaults)
        warn_misrouted(owner, self._split_by_ndim)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, routed like the groups given at construction:
        split into matrix and fallback parts (:func:`~lightning_spectral.optim.param_groups.split_group`,
        then :meth:`_route`), the fallback parts completed by :attr:`fallback_rule`, every part
        checked (:meth:`_prepare_group`) before torch adds it."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        index, owner = self._groups_added, type(self).__name__
        self._groups_added += 1
        group = named_group(param_group)
        for i, p in enumerate(group["params"]):
            _refuse_unsupported(owner, group, index, i, p)
        by_ndim = MATRIX_KEY not in group and USE_MUON_KEY not in group
        for part in self._route(split_group(group, index), index):
            if by_ndim and part[MATRIX_KEY]:
                self._split_by_ndim.extend(part.get("param_names", ()))
            if part[MATRIX_KEY]:
                self._prepare_group(part)
            else:
                for key, value in self.fallback_rule.items():
                    part.setdefault(key, value)
            check_group_values(owner, {**self.defaults, **part}, where=f" (param group {part.get('name', index)})")
            super().add_param_group(part)

    def _route(self, parts: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        """The groups a new group's matrix and fallback parts become (a constrained optimizer moves
        matrices its set cannot hold to the fallback here); ``index`` counts the groups added."""
        return parts

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Check or complete a matrix group before torch adds it (its own keys; the defaults follow)."""

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, groups) and this optimizer's own attributes (the finite check,
        the fallback rule, a solver), so that ``copy.deepcopy`` and pickling keep them; torch's
        hook tables stay out, as torch leaves them out."""
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")})
        return state

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Run ``closure`` (if given) with gradients enabled, then update every group.

        Raises:
            NonFiniteGradientError: a gradient holds NaN/Inf; no parameter was changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_sparse_gradients()
        for index, group in enumerate(self.param_groups):  # an lr a scheduler or a user set since
            check_group_values(type(self).__name__, group, where=f" (param group {group.get('name', index)})")
        self._consolidated = None  # gathered before this step: stale after it
        if self.check_finite == "lazy":
            if self._sharded_grads():
                raise ValueError(f"{type(self).__name__}: check_finite='lazy' does not support parameters sharded as "
                                 "DTensor (FSDP2 / ModelParallelStrategy); build the optimizer with check_finite=True")
            self._lazy_steps += 1
            if self.lazy_check_every and self._lazy_steps % self.lazy_check_every == 0:
                self.raise_if_nonfinite()
            with _autocast_disabled(), _float_lrs(self.param_groups):
                self._masked_update()
            return loss
        if not self.check_finite:
            with _autocast_disabled(), _float_lrs(self.param_groups):
                self._update()
            return loss
        self._check_finite()
        before = [(p, p.detach().clone()) for g in self.param_groups for p in g["params"] if p.grad is not None]
        try:
            with _autocast_disabled(), _float_lrs(self.param_groups):
                self._update()
        except BaseException:
            for p, old in before:  # a step that failed half-way leaves no weight changed
                p.copy_(old)
            raise
        self._check_stepped_weights(before)
        return loss

    def _check_stepped_weights(self, before: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After a step on finite gradients: every updated weight finite (one fused reduction and
        one host sync), else the weights are put back and the step refused, naming the first weight
        it made non-finite (a step that overflowed: an lr, budget or gradient too large for the
        dtype). Sharded weights are checked on each rank's shard, all ranks refusing together."""
        names = {id(p): (index, i) for index, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])}
        bad = first_nonfinite((names[id(p)], p) for p, _ in before)
        if not _refused(bad, [p for p, _ in before if is_sharded(p)]):
            return
        for p, old in before:
            p.copy_(old)
        where = self.param_name(*bad) if bad is not None else "a parameter sharded on another rank"
        raise NonFiniteGradientError(
            f"{type(self).__name__}: the step made {where} hold NaN or Inf although every gradient was finite (a "
            "step too large for the weights' dtype); the weights were put back (the optimizer state may have "
            "moved). Lower the learning rate or the spectral budget, or clip gradients."
        )

    # ``check_finite="lazy"``: every this many steps, ``step()`` reads the skipped-step count
    # back (one host sync) and raises if it is not zero; 0: only where the count is read.
    lazy_check_every = 1000
    _lazy_steps = 0
    _nonfinite: Optional[dict[torch.device, torch.Tensor]] = None

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for non-finite gradients under ``check_finite="lazy"`` (one host sync)."""
        return sum(int(count) for count in (self._nonfinite or {}).values())

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteGradientError` if ``check_finite="lazy"`` skipped any step (one
        host sync); the count starts again from zero after it was raised."""
        skipped = self.nonfinite_steps
        if skipped:
            self._nonfinite = None
            raise NonFiniteGradientError(
                f"{type(self).__name__}: {skipped} step(s) had a gradient holding NaN or Inf, or a step that made a weight non-finite; those steps were "
                "skipped (weights and state tensors left as they were). Lower the learning rate, clip gradients, "
                "or use bf16/fp32 instead of fp16."
            )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, holding every matrix's state. Where the matrix work is split across
        ranks each rank holds only the state of the matrices it owns: the others' is gathered here
        (a collective: call it on every rank), unless :meth:`consolidate_state_dict` has gathered
        it since the last step."""
        if self.check_finite == "lazy":
            self.raise_if_nonfinite()
        consolidated, self._consolidated = self._consolidated, None
        if consolidated is not None:
            return consolidated
        with whole_state(self):
            return super().state_dict()

    _consolidated: Optional[dict[str, Any]] = None

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the whole state dict for rank ``to``'s next :meth:`state_dict` (collective: every
        rank calls it; Lightning does before asking rank 0 alone for the optimizer's state, as for
        ``torch.distributed.optim.ZeroRedundancyOptimizer``)."""
        state = self.state_dict()
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._consolidated = state if rank == to else None

    def _masked_update(self) -> None:
        """The update, kept only where every gradient (of its device) is finite: no host sync.

        The gradients are replaced for the update by ``where(finite, g, 0)`` (so no NaN enters a
        computation whose result is then masked); every parameter and state tensor is copied
        before and set after to ``torch.where(finite, new, old)`` (by key: also where the step
        replaced the tensor object); a state tensor the step created is set to
        ``where(finite, new, 0)``, zero being its value when fresh."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = finite_flags(p.grad for p in params)
        saved = {p: p.grad for p in params}
        before = {}
        for p in params:
            p.grad = torch.where(finite[p.grad.device], p.grad, p.grad.new_zeros(()))
            before[p] = (p.detach().clone(), {key: value.clone() for key, value in self.state[p].items()
                                              if isinstance(value, torch.Tensor)})
        try:
            self._update()
        finally:
            for p in params:
                p.grad = saved[p]
        # ... and where every weight it wrote is finite (a finite gradient can still overflow a step).
        for device, flag in finite_flags(params).items():
            finite[device] = finite[device] & flag
        counts = self._nonfinite if self._nonfinite is not None else {}
        for device, flag in finite.items():
            counts[device] = counts.get(device, torch.zeros((), dtype=torch.int64, device=device)) + (~flag).long()
        self._nonfinite = counts
        for p, (old_p, old_state) in before.items():
            flag = finite[p.grad.device]
            p.copy_(torch.where(flag, p, old_p))
            for key, value in self.state[p].items():
                if not isinstance(value, torch.Tensor):
                    continue
                old = old_state.get(key)
                if old is None or old.shape != value.shape or old.dtype != value.dtype:
                    old = torch.zeros_like(value)
                value.copy_(torch.where(flag.to(value.device), value, old))

    def _update(self) -> None:
        matrices = []
        for group in self.param_groups:
            # (an empty tensor, such as a 0 × n matrix, has nothing to step)
            params = [p for p in group["params"] if p.grad is not None and p.numel()]
            if params and group[MATRIX_KEY]:
                matrices.append((group, params))
            elif params:
                self._fallback_step(group, params)
        step_matrices(self, matrices)

    # Split the matrix work across the ranks of torch.distributed (:mod:`.distributed`); ``False``
    # repeats it on every rank.
    distribute_work = True
    # The dtype the whole steps' results return to the shards' ranks in under FSDP2 (``None``: their
    # own; ``torch.bfloat16`` halves the bytes, each update entry rounded to nearest, :mod:`.distributed`).
    communication_dtype: Optional[torch.dtype] = None

    # -- the matrix rule in three parts -----------------------------------------------------
    # A subclass implements :meth:`_pre_step`, :meth:`_whole_step` and :meth:`_apply_step` (or
    # overrides :meth:`_matrix_step` itself). :meth:`_matrix_step` runs the three in one process;
    # under FSDP2 (:mod:`.distributed`) the two elementwise parts run on every rank's shards and
    # the whole-matrix part once per matrix, on its owner, from an all-to-all of the shards.

    # The state keys :meth:`_pre_step` reads and writes: shaped like the parameter (kept sharded as
    # the parameter is) or plain values every rank keeps alike. Every other key is the whole-matrix
    # part's (a dual, singular vectors, a solver's warm start), kept by the matrix's owner only.
    _elementwise_state: tuple[str, ...] = ("momentum_buffer",)

    def _pre_step(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        """Elementwise (``p``, ``grad`` and ``state``'s tensors may be the same shard of each):
        update the momentum-like state, return the matrix (``p``'s shape) the whole step takes."""
        raise NotImplementedError

    def _needs_weight(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`_whole_step` reads the weights (a tangent space or a retraction at ``W``)."""
        return False

    def _needs_whole(self, group: dict[str, Any]) -> bool:
        """``False`` where the whole step is the identity (an unbudgeted step): nothing is gathered."""
        return True

    def _whole_step(self, group: dict[str, Any], W: Optional[torch.Tensor], M: torch.Tensor,
                    states: list[dict]) -> torch.Tensor:
        """The part of the rule that needs whole matrices, on a stack of ``k`` same-shaped ones:
        ``M`` (``k × m × n``) from :meth:`_pre_step`, the weights ``W`` (same shape, ``None``
        unless :meth:`_needs_weight`), ``states[i]`` matrix ``i``'s whole-matrix state (every key
        but :attr:`_elementwise_state`). Returns the ``k`` results :meth:`_apply_step` takes."""
        raise NotImplementedError

    def _apply_step(self, group: dict[str, Any], p: torch.Tensor, result: torch.Tensor, shape: torch.Size) -> None:
        """Elementwise: update ``p`` (a shard of a matrix of ``shape``, or the matrix) from its
        (shard of the) result."""
        raise NotImplementedError

    def _whole_with_state(self, group: dict[str, Any], W: Optional[torch.Tensor], M: torch.Tensor,
                          states: list[dict]) -> torch.Tensor:
        """:meth:`_whole_step` on the whole-matrix part of each of ``states`` (full state dicts),
        written back: keys it added, replaced or deleted."""
        views = [{k: v for k, v in st.items() if k not in self._elementwise_state} for st in states]
        result = self._whole_step(group, W, M, views)
        for st, view in zip(states, views):
            for key in [k for k in st if k not in self._elementwise_state and k not in view]:
                del st[key]
            st.update(view)
        return result

    def _matrix_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One process's step of a matrix group's ``params``: :meth:`_pre_step` of each, then
        :meth:`_whole_step` once per stack of same-shaped matrices, then :meth:`_apply_step`."""
        batches: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            M = as_matrix(self._pre_step(group, p, p.grad, self.state[p]))
            batches.setdefault((M.shape, M.dtype, M.device), []).append((p, M))
        whole = self._needs_whole(group)
        for items in batches.values():
            members = [p for p, _ in items]
            results = [M for _, M in items]
            if whole:
                W = torch.stack([as_matrix(p) for p in members]) if self._needs_weight(group) else None
                results = self._whole_with_state(group, W, torch.stack(results), [self.state[p] for p in members])
            for p, result in zip(members, results):
                self._apply_step(group, p, result, p.shape)

    def _fallback_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        if group["algorithm"] == "adamw":
            for p, st in zip(params, states):
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            beta1, beta2 = group["betas"]
            adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                  [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        else:
            buffers = [s.get("momentum_buffer") for s in states]
            sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["fallback_momentum"],
                lr=group["lr"], dampening=0.0, nesterov=group["fallback_nesterov"], maximize=False)
            if group["fallback_momentum"] > 0:
                for st, buf in zip(states, buffers):
                    st["momentum_buffer"] = buf

    def _check_finite(self) -> None:
        """:func:`first_nonfinite` over all gradients: one fused reduction and one host sync per
        device, the tensors checked one by one only to name the first bad one."""
        bad = first_nonfinite(((index, i), p.grad) for index, group in enumerate(self.param_groups)
                              for i, p in enumerate(group["params"]) if p.grad is not None)
        sharded = self._sharded_grads()
        # Each rank checked its shards: all ranks refuse the step together.
        if _refused(bad, sharded):
            where = self.param_name(*bad) if bad is not None else "a parameter sharded on another rank"
            raise NonFiniteGradientError(
                f"{type(self).__name__}: the gradient of {where} holds NaN or Inf; the step was refused and no "
                "weight was changed. Lower the learning rate, clip gradients, or use bf16/fp32 instead of fp16."
            )

    def _refuse_sparse_gradients(self) -> None:
        """A sparse gradient (``nn.Embedding(sparse=True)``) is refused before any weight changes,
        naming its parameter, as torch's optimizers without sparse support refuse it; an SGD
        fallback takes it, as ``torch.optim.SGD`` does."""
        for index, group in enumerate(self.param_groups):
            if not group[MATRIX_KEY] and group["algorithm"] == "sgd":
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: the gradient of "
                        f"{self.param_name(index, i)} is {p.grad.layout}; no weight was changed. Build its module "
                        "with sparse=False (nn.Embedding's default), or give it to torch.optim.SparseAdam."
                    )

    def _sharded_grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None and is_sharded(p)]

    # -- checkpoints ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, after checking what it would take on trust:
        every group's ``lr`` and ``weight_decay`` (finite, ``>= 0``: a negative lr turns descent
        into ascent), every state tensor finite (a NaN momentum buffer turns the weights NaN at the
        first step) and of the shape this optimizer needs for its parameter (a checkpoint of another
        model would load and fail at the first step). Each refusal names the group or the tensor,
        and nothing is changed. A matrix group's settings pass :meth:`_prepare_group` (torch.optim.Muon's
        keys are read as this package's); settings added since the checkpoint was written keep
        the values they have here."""
        owner = f"{type(self).__name__}.load_state_dict"
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"{owner}: the state dict has {len(state_dict['param_groups'])} param group(s), this optimizer "
                f"{len(self.param_groups)} (its matrix and fallback groups: {[g.get('name') or ('matrix' if g[MATRIX_KEY] else 'fallback') for g in self.param_groups]}). "
                "A torch.optim.Muon state dict holds only its 2-D matrices: build this optimizer on those same "
                "matrices (e.g. [p for p in model.parameters() if p.ndim == 2]), or load the checkpoint of this "
                "optimizer's own model."
            )
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        here = [(index, i) for index, g in enumerate(self.param_groups) for i in range(len(g["params"]))]
        for key, (index, i) in zip(saved, here):
            group = self.param_groups[index]
            expected = self._state_shapes(group, group["params"][i])
            for name, value in state_dict["state"].get(key, {}).items():
                where = f"the state '{name}' of {self.param_name(index, i)}"
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{owner}: {where} is {value}: the state was saved after a non-finite step. "
                                     "Load an earlier checkpoint.")
                if not isinstance(value, torch.Tensor):
                    continue
                if name in expected and tuple(value.shape) != tuple(expected[name]):
                    raise ValueError(
                        f"{owner}: {where} has shape {tuple(value.shape)}, but this parameter needs "
                        f"{tuple(expected[name])}: the checkpoint was written for another model (or another parameter "
                        "order). Load this model's checkpoint, or build the model and optimizer the checkpoint was "
                        "written with."
                    )
                if value.is_floating_point() and first_nonfinite([(0, value)]) is not None:
                    raise ValueError(
                        f"{owner}: {where} holds NaN or Inf: the state was saved after a non-finite step, and "
                        "its first step here would make the weights non-finite. Load an earlier checkpoint."
                    )
        groups = []
        for index, (group, current) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            group = dict(group)
            check_group_values(owner, group, where=f" (param group {group.get('name', index)} of the state dict)")
            if group.get(MATRIX_KEY, current[MATRIX_KEY]):
                self._prepare_group(group)
            groups.append(group)
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(dict(state_dict, param_groups=groups + list(state_dict["param_groups"][len(groups):])))
        self._work_split = None  # every rank holds the whole loaded state (its first step keeps its own)
        for group, before in zip(self.param_groups, current):
            for name, value in before.items():
                group.setdefault(name, value)
        for state in self.state.values():  # a step counter saved as a number, as torch's AdamW reads it
            if isinstance(state, dict) and "step" in state and not isinstance(state["step"], torch.Tensor):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    def _state_shapes(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Shapes of the state tensors of ``p`` that have one (momentum and Adam moments: ``p``'s)."""
        return {name: tuple(p.shape) for name in ("momentum_buffer", "exp_avg", "exp_avg_sq")}

    # -- reporting ------------------------------------------------------------------------
    def param_name(self, group_index: int, i: int) -> str:
        return describe_param(self.param_groups[group_index], group_index, i)

    @torch.no_grad()
    def constraint_report(self, names: Optional[Mapping[torch.Tensor, str]] = None) -> dict[str, dict[str, float]]:
        """Per matrix parameter: ``constraint`` (distance to the optimizer's constraint set, where
        it has one), ``inner_iterations`` and ``inner_residual`` of its last inner solve. A parameter
        is named by ``names`` (e.g. ``{p: n for n, p in module.named_parameters()}``), else by its
        group's ``param_names``, else ``<group name or index>.<position>``."""
        report: dict[str, dict[str, float]] = {}
        names = names or {}
        for index, group in enumerate(self.param_groups):
            if not group[MATRIX_KEY]:
                continue
            given = group.get("param_names") or [f"{group.get('name', index)}.{i}" for i in range(len(group["params"]))]
            inner = owner_values(self, group["params"], ("inner_iterations", "inner_residual"))
            for p, own, entry in zip(group["params"], given, inner):
                name = names.get(p, own)
                state = self.state.get(p, {})
                # A sharded matrix's distance is its full matrix's (an all-gather: every rank reports).
                distance = self._constraint_distance(group, p.full_tensor() if is_sharded(p) else p, state)
                if distance is not None:
                    entry["constraint"] = distance
                if entry:
                    report[name] = entry
        return report

    def _constraint_distance(self, group: dict[str, Any], p: torch.Tensor, state: dict) -> Optional[float]:
        return None


@contextlib.contextmanager
def _float_lrs(groups: list[dict[str, Any]]) -> Iterator[None]:
    """Tensor learning rates (and the ``initial_lr`` schedulers record) read as floats for the update,
    as ``torch.optim.Muon`` reads them (one host sync where such a tensor lives on a GPU), then put
    back: a scheduler keeps writing into the tensor."""
    tensors = [(g, key, g[key]) for g in groups for key in ("lr", "initial_lr") if isinstance(g.get(key), torch.Tensor)]
    for group, key, value in tensors:
        group[key] = float(value)
    try:
        yield
    finally:
        for group, key, value in tensors:
            group[key] = value


@contextlib.contextmanager
def _autocast_disabled() -> Iterator[None]:
    """The update runs outside autocast. Lightning calls ``optimizer.step()`` inside
    ``training_step``, i.e. inside the ``bf16-mixed``/``16-mixed`` autocast region, where every
    matmul of msign and of the retractions would silently drop to 16 bits (measured: the
    Stiefel constraint drifted to 5e-3 in 6 steps instead of 2e-7). Where 16 bits are safe the
    optimizers ask for them explicitly (``ns_dtype``). Two plain ``torch.autocast`` contexts
    (no ``ExitStack``), which ``torch.compile`` traces."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _refused(bad: Any, sharded: list[torch.Tensor]) -> bool:
    """Whether a check that found ``bad`` (``None``: nothing) refuses the step: with sharded
    tensors, on every rank when any rank found one (one all-reduce)."""
    return _any_rank(bad is not None, sharded[0].device) if sharded else bad is not None


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-reduced over all ranks (one all-reduce, staged on ``device``: NCCL sends no CPU tensors)."""
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())
