"""``UpdateSizeMonitor``: per layer, the size of one optimizer step against the weight and the optimizer's promise."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_spectral.callbacks._base import (
    DiagnosticCallback,
    check_choice,
    check_positive_int,
    log_step,
    refuse_sharded,
)
from lightning_spectral.diagnostics.spectral import spectral_layers
from lightning_spectral.diagnostics.update_size import UpdateSizeTracker, promised_update_norm

#: The metrics of each layer, ``update/<metric>/<layer>`` (see :mod:`lightning_spectral.diagnostics.update_size`).
UPDATE_METRICS = ("spectral_norm", "rms", "spectral_to_weight", "rms_to_weight", "spectral_to_promised",
                  "rms_to_promised")


class UpdateSizeMonitor(DiagnosticCallback):
    r"""Log, for every Linear and conv layer, the step :math:`\Delta W = W_{s} - W_{s-1}` every N optimizer steps.

    Keys (``<layer>`` the module name): ``update/spectral_norm/<layer>`` :math:`\|\Delta W\|_2`,
    ``update/rms/<layer>``, ``update/spectral_to_weight/<layer>`` :math:`\|\Delta W\|_2/\|W\|_2`,
    ``update/rms_to_weight/<layer>`` :math:`\|\Delta W\|_F/\|W\|_F`, and where the optimizer
    promises a spectral step size :math:`\rho`
    (:func:`~lightning_spectral.diagnostics.update_size.promised_update_norm`: Muon's
    :math:`\eta s`, MuonSGD/MuonAdamW's budget) ``update/spectral_to_promised/<layer>`` and
    ``update/rms_to_promised/<layer>``; ``update/max/<metric>`` is the maximum over layers.
    The step measured is the one that makes step ``s`` (``s`` a multiple of ``every_n_steps``):
    the weights are copied at the start of the batch that takes it and compared once the optimizer
    has stepped, and the values are logged at ``s``, the step of the parameters they produced.

    Works with any LightningModule and optimizer (automatic or manual optimization, gradient
    accumulation: the batch whose optimizer step completes is the one measured). Rank 0 measures
    (the weights are the same on every rank). Refused with DTensor-sharded parameters.

    Args:
        every_n_steps: measure the step that completes every N-th optimizer step (default 50).
        method: ``"power"`` (warm-started power iteration, vectors checkpointed) or ``"svd"``.
        max_iter, tol: power-iteration limits per norm.
        max_layers: only the first N layers (default all).
        seed: seed of the first power-iteration vectors.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        method: Literal["power", "svd"] = "power",
        max_iter: int = 20,
        tol: float = 1e-4,
        max_layers: int | None = None,
        seed: int = 0,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        check_choice("method", method, ("power", "svd"))
        check_positive_int("max_iter", max_iter)
        check_positive_int("max_layers", max_layers, allow_none=True)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        super().__init__(every_n_steps)
        self.max_layers = max_layers
        self.tracker = UpdateSizeTracker(method=method, max_iter=max_iter, tol=tol, seed=seed)
        self._steps_before = -1  # optimizer steps (trainer.global_step) when the snapshot was taken

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(type(self).__name__, trainer, pl_module,
                       "it copies each full weight matrix before the step on rank 0")
        super().on_fit_start(trainer, pl_module)

    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """One chart per metric, a line per layer."""
        names = [re.escape(name) + "$" for name in self._weights(pl_module)]
        return {f"update {key} per layer": [f"update/{key}/{name}" for name in names] for key in UPDATE_METRICS}

    def _weights(self, pl_module: nn.Module) -> dict[str, Tensor]:
        return {name: module.weight for name, module in spectral_layers(pl_module, max_layers=self.max_layers)
                if module.weight.requires_grad}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = log_step(trainer) + 1  # the step this batch's optimizer step completes
        if self.tracker.pending or step % self.every_n_steps or step == self._last_step:
            return
        self._steps_before = trainer.global_step
        if trainer.is_global_zero:
            owners = _param_owners(trainer.optimizers)
            self.tracker.snapshot({name: (w, promised_update_norm(*owners[w], w) if w in owners else None)
                                   for name, w in self._weights(pl_module).items()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning counts the batch as stepped after this hook, hence the + 1.
        if self._steps_before >= 0 and trainer.global_step > self._steps_before:
            self._steps_before = -1
            self._run(trainer, pl_module, batch, log_step(trainer) + 1)

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        if not self.tracker.pending:
            return {}
        per_layer = self.tracker.measure(self._weights(pl_module))
        metrics = {f"update/{key}/{name}": value for name, values in per_layer.items() for key, value in values.items()}
        for key in UPDATE_METRICS:
            values = [v[key] for v in per_layer.values() if key in v and math.isfinite(v[key])]
            if values:
                metrics[f"update/max/{key}"] = max(values)
        return metrics


def _param_owners(optimizers: list[torch.optim.Optimizer]) -> dict[Tensor, tuple[torch.optim.Optimizer, dict]]:
    """``{parameter: (optimizer, its group)}`` over every optimizer of the trainer."""
    return {p: (opt, group) for opt in optimizers for group in opt.param_groups for p in group["params"]}
