"""``SharpnessMonitor``: the top Hessian eigenvalue of the training loss, beside each rule's stability threshold."""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_spectral.callbacks._base import (
    DiagnosticCallback,
    batch_loss,
    check_choice,
    check_loss_protocol,
    check_positive_int,
    has_sharded_parameters,
)
from lightning_spectral.diagnostics._utils import (
    LossFn,
    isolated,
    local,
    random_vector,
    shard_reduce,
    trainable_parameters,
)
from lightning_spectral.diagnostics.sharpness import ShardedHVP, hessian_top_eigenvalue, hessian_vector_products
from lightning_spectral.diagnostics.stability import StabilityRule, adam_inverse_preconditioner, stability_rule


class SharpnessMonitor(DiagnosticCallback):
    r"""Log :math:`\lambda_{\max}` of the loss Hessian on the current training batch, beside each rule's threshold.

    Hessian-vector products by double backward on the unwrapped module, with
    ``torch.autograd.grad`` (``.grad`` untouched), in fp32, RNG forked, in eval mode by default
    (the curvature of the eval-mode loss; ``eval_mode=False`` uses train mode and restores the
    buffers). Under DDP rank 0 measures its local batch. Needs double backward, so not through
    ``torch.compile``. With FSDP2-sharded parameters (``ModelParallelStrategy``) every rank
    measures and the Hessian is that of the ranks' mean loss (every rank's batch), the vectors held
    as local shards and their inner products summed over the ranks; ``sharded_hvp`` picks the
    products (:func:`~lightning_spectral.diagnostics.sharpness.hessian_vector_products`): ``"exact"``
    (double backward on the network unsharded for the measurement: the whole parameters on every
    rank) or ``"finite_difference"`` (everything stays sharded; smooth losses only, relative error
    :math:`O(\mathrm{eps}^{2/3})`; biased by ReLU kinks).

    Keys: ``sharpness/lambda_max``, ``sharpness/hvp_count``, and per *rule* (the parameter groups
    that share an optimizer, an update rule and its hyperparameters, named by their group names
    joined with ``+``, e.g. ``matrix+head+vector``; an unnamed group by its optimizer's class):

    - SGD-family groups (``torch.optim.SGD``, a package optimizer's SGD fallback, an unbudgeted
      MuonSGD): ``sharpness/threshold/<rule>``, the largest stable :math:`\lambda_{\max}`:
      :math:`2/\eta` without momentum, :math:`(2+2\beta)/\eta` with heavy-ball momentum,
      :math:`(2+2\beta)/((1+2\beta)\eta)` with Nesterov (less any coupled weight decay, see
      :mod:`lightning_spectral.diagnostics.stability`);
    - Adam-family groups (``Adam``, ``AdamW``, AdamW fallbacks, an unbudgeted MuonAdamW), with
      ``preconditioned=True``: ``sharpness/preconditioned/<rule>``, :math:`\lambda_{\max}(P^{-1}H)`
      over the rule's parameters (the others held fixed; :math:`P` of the latest Adam step, from
      ``exp_avg_sq``), and ``sharpness/threshold/<rule>`` :math:`(2+2\beta_1)/((1-\beta_1)\eta)`
      (Cohen et al. 2022); nothing before the first step;
    - every other rule (Muon, budgets, manifolds): nothing; no threshold is known for them.

    The TensorBoard layout (:meth:`charts`) draws each rule's sharpness and threshold on one chart.

    Args:
        every_n_steps: measure every N optimizer steps (default 100), or
        every_n_epochs: measure at the end of every N-th epoch, on its last training batch.
        method: ``"power"`` (power iteration, shifted if the dominant eigenvalue is negative) or
            ``"lanczos"`` (stores ``max_iter`` parameter-sized vectors).
        max_iter, tol: iteration limit and relative tolerance on the eigenvalue.
        loss_fn: ``loss_fn(model, x, y)``; default: the module's ``loss_for_batch(batch)``, else
            ``criterion(module(x), y)``, else (automatic optimization) the loss its ``training_step``
            returns, see :func:`~lightning_spectral.callbacks._base.batch_loss`.
        eval_mode: measure in eval mode (default) or in train mode with buffers restored.
        warm_start: start from the previous top eigenvectors (kept in memory, not checkpointed).
        seed: seed of the first start vector (the global RNG is not used).
        preconditioned: also measure each Adam-family rule's preconditioned sharpness (one more
            eigenvalue solve per rule, on the same Hessian-vector products).
        sharded_hvp: ``"exact"`` or ``"finite_difference"``, for FSDP2-sharded parameters only.
    """

    default_every_n_steps = 100
    needs_batch = True

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        method: Literal["power", "lanczos"] = "power",
        max_iter: int = 20,
        tol: float = 1e-3,
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
        warm_start: bool = True,
        seed: int = 0,
        preconditioned: bool = True,
        sharded_hvp: ShardedHVP = "exact",
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        check_choice("method", method, ("power", "lanczos"))
        check_choice("sharded_hvp", sharded_hvp, ("exact", "finite_difference"))
        check_positive_int("max_iter", max_iter)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.method = method
        self.max_iter = max_iter
        self.tol = tol
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.warm_start = warm_start
        self.seed = seed
        self.preconditioned = preconditioned
        self.sharded_hvp = sharded_hvp
        self._vectors: dict[str, Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_loss_protocol(type(self).__name__, pl_module, self.loss_fn)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:  # on every rank: each sees the same parameters
            shard_reduce(trainable_parameters(pl_module))
        except ValueError as error:
            raise MisconfigurationException(f"{type(self).__name__}: {error}") from None
        super().on_fit_start(trainer, pl_module)

    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """One chart per rule with a threshold: its sharpness (raw or preconditioned) and the threshold."""
        out = {}
        for name, (_, rule, _) in stability_rules(trainer).items():
            if rule.kind == "adam" and not self.preconditioned:
                continue
            sharpness = "sharpness/lambda_max" if rule.kind == "sgd" else f"sharpness/preconditioned/{name}"
            out[f"sharpness vs stability threshold: {name}"] = [
                re.escape(sharpness) + "$", re.escape(f"sharpness/threshold/{name}") + "$"]
        return out

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        if not (trainer.is_global_zero or has_sharded_parameters(pl_module)):
            return {}
        params = trainable_parameters(pl_module)
        rules = stability_rules(trainer)
        metrics: dict[str, float] = {}
        loss = functools.partial(batch_loss, pl_module, batch, self.loss_fn)
        with isolated(pl_module, self.eval_mode), hessian_vector_products(pl_module, loss, params,
                                                                          self.sharded_hvp) as hvp:
            lam, used = self._top(hvp, params, "", step)
            metrics["sharpness/lambda_max"] = lam
            measured = set(params)
            for name, (optimizer, rule, members) in rules.items():
                members = [p for p in members if p in measured]
                if rule.kind == "adam" and members:
                    if not self.preconditioned:
                        continue
                    inverse = adam_inverse_preconditioner(optimizer, members, rule)
                    if inverse is None:  # no Adam step yet
                        continue
                    preconditioned, more = self._top(_block(hvp, params, members, inverse.to(hvp.like)),
                                                     members, name, step, hvp.reduce)
                    used += more
                    metrics[f"sharpness/preconditioned/{name}"] = preconditioned
                metrics[f"sharpness/threshold/{name}"] = rule.threshold
        metrics["sharpness/hvp_count"] = float(used)
        return metrics

    def _top(self, matvec: Any, params: list[Tensor], key: str, step: int, reduce: Any = None) -> tuple[float, int]:
        """The top eigenvalue of ``matvec`` on vectors over ``params`` (warm-started from the vector kept
        under ``key``); ``reduce`` sums inner products over the ranks (default: ``matvec.reduce``)."""
        reduce = matvec.reduce if reduce is None else reduce
        numel = sum(local(p).numel() for p in params)
        v0 = self._vectors.get(key)
        if v0 is None or v0.numel() != numel:
            v0 = random_vector(params, torch.Generator().manual_seed(self.seed + step)).to(local(params[0]).detach())
        lam, vector, used = hessian_top_eigenvalue(matvec, v0, self.method, self.max_iter, self.tol, reduce)
        if self.warm_start:
            self._vectors[key] = vector
        return lam, used


def _block(hvp: Any, params: list[Tensor], members: list[Tensor], inverse: Tensor) -> Any:
    r"""``x ↦ S H_{bb} S x`` with :math:`S = P^{-1/2}` on the block ``b`` of ``members`` (the rest of the
    vector zero): symmetric, with the eigenvalues of :math:`P^{-1}H_{bb}`. Sharded: on the local shards."""
    offsets, start = {}, 0
    for p in params:
        offsets[p] = (start, local(p).numel())
        start += local(p).numel()
    index = torch.cat([torch.arange(offsets[p][0], offsets[p][0] + offsets[p][1]) for p in members]).to(inverse.device)
    scale = inverse.sqrt()

    def matvec(x: Tensor) -> Tensor:
        full = torch.zeros(hvp.numel, dtype=x.dtype, device=x.device)
        full[index] = scale * x
        return scale * hvp(full)[index]

    return matvec


def stability_rules(trainer: pl.Trainer) -> dict[str, tuple[torch.optim.Optimizer, StabilityRule, list[Tensor]]]:
    """``{rule name: (optimizer, rule, trainable parameters)}``: the parameter groups with a known threshold
    (:func:`~lightning_spectral.diagnostics.stability.stability_rule`), those of one optimizer that share a
    rule merged, named by their group names joined with ``+`` (an unnamed group: its optimizer's class,
    ``-pg<j>`` added when the optimizer has several groups; ``opt<i>-`` first with several optimizers)."""
    merged: dict[tuple[int, StabilityRule], tuple[list[str], list[Tensor]]] = {}
    for i, optimizer in enumerate(trainer.optimizers):
        for j, group in enumerate(optimizer.param_groups):
            rule = stability_rule(optimizer, group)
            members = [p for p in group["params"] if p.requires_grad]
            if rule is None or not members:
                continue
            name = group.get("name") or (type(optimizer).__name__ if len(optimizer.param_groups) == 1
                                         else f"{type(optimizer).__name__}-pg{j}")
            names, params = merged.setdefault((i, rule), ([], []))
            names.append(f"opt{i}-{name}" if len(trainer.optimizers) > 1 else str(name))
            params.extend(members)
    return {"+".join(names): (trainer.optimizers[i], rule, params) for (i, rule), (names, params) in merged.items()}
