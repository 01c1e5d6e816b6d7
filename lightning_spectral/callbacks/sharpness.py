"""``SharpnessMonitor``: the top Hessian eigenvalue of the training loss, beside ``2/lr``."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_spectral.callbacks._base import (
    DiagnosticCallback,
    batch_loss,
    check_choice,
    check_loss_protocol,
    check_positive_int,
    refuse_sharded,
)
from lightning_spectral.diagnostics._utils import LossFn, isolated, trainable_parameters
from lightning_spectral.diagnostics.sharpness import HessianVectorProduct, hessian_top_eigenvalue


class SharpnessMonitor(DiagnosticCallback):
    r"""Log :math:`\lambda_{\max}` of the loss Hessian on the current training batch, and ``2/lr``.

    Hessian-vector products by double backward on the unwrapped module, with
    ``torch.autograd.grad`` (``.grad`` untouched), in fp32, RNG forked, in eval mode by default
    (the curvature of the eval-mode loss; ``eval_mode=False`` uses train mode and restores the
    buffers). Under DDP rank 0 measures its local batch. Needs double backward, so not through
    ``torch.compile``. Refused (on every rank, at fit start) with DTensor-sharded parameters.

    Keys: ``sharpness/lambda_max``, ``sharpness/hvp_count`` and ``sharpness/2_over_lr`` (one per
    param group, ``sharpness/2_over_lr/<name>``, when there are several). Plain gradient descent
    is stable while :math:`\lambda_{\max}<2/\eta`; with heavy-ball momentum :math:`\beta` the
    threshold is :math:`(2+2\beta)/\eta`, and for adaptive methods it applies to the
    preconditioned Hessian.

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
        warm_start: start from the previous top eigenvector (kept in memory, not checkpointed).
        seed: seed of the first start vector (the global RNG is not used).
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
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        check_choice("method", method, ("power", "lanczos"))
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
        self._vector: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_loss_protocol(type(self).__name__, pl_module, self.loss_fn)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(type(self).__name__, trainer, pl_module,
                       "its Hessian-vector products run a forward and double backward on rank 0 alone")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        if not trainer.is_global_zero:
            return {}
        params = trainable_parameters(pl_module)
        with isolated(pl_module, self.eval_mode):
            hvp = HessianVectorProduct(batch_loss(pl_module, batch, self.loss_fn), params)
            v0 = self._vector
            if v0 is None or v0.shape != hvp.grad.shape:
                generator = torch.Generator().manual_seed(self.seed + step)
                v0 = torch.randn(hvp.numel, generator=generator).to(hvp.grad)
            lam, vector, used = hessian_top_eigenvalue(hvp, v0, self.method, self.max_iter, self.tol)
        self._vector = vector if self.warm_start else None
        return {"sharpness/lambda_max": lam, "sharpness/hvp_count": float(used), **two_over_lr(trainer)}


def two_over_lr(trainer: pl.Trainer) -> dict[str, float]:
    """``sharpness/2_over_lr`` for each param group with a positive lr (named like ``LearningRateMonitor``)."""
    groups = [
        (i, j, group)
        for i, optimizer in enumerate(trainer.optimizers)
        for j, group in enumerate(optimizer.param_groups)
    ]
    out = {}
    for i, j, group in groups:
        lr = float(group.get("lr", 0.0))
        if lr <= 0:
            continue
        if len(groups) == 1:
            key = "sharpness/2_over_lr"
        else:
            name = group.get("name", f"pg{j}")
            key = f"sharpness/2_over_lr/{f'opt{i}-' if len(trainer.optimizers) > 1 else ''}{name}"
        out[key] = 2.0 / lr
    return out
