"""``EpochRecorder``: one row of metrics per training epoch, written to ``history.json``/``.csv``.

The row holds ``epoch, step, train_loss, train_acc, val_loss, val_acc, max_spectral_norm,
sharpness, grad_noise_scale, lr, time`` (the columns of
:class:`~lightning_spectral.diagnostics.MetricsLogger`), read from what the module logged
(``train/loss``, ``val/acc``, ...) and from the diagnostic callbacks' ``last_metrics``; the mean
time of an optimizer step (``step_time_ms``); and, for optimizers with ``constraint_report()``,
the epoch means of the inner solver's iterations and residual and of the distance to the
constraint (each the maximum over parameters at its step: ``solver_inner_iterations``,
``solver_inner_residual``, ``solver_constraint``). The rows are also checkpointed, so a resumed
run keeps the epochs it had.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle

from lightning_spectral.callbacks._base import unsharded_weights
from lightning_spectral.diagnostics import MetricsLogger, compute_spectral_norms

DIAGNOSTIC_KEYS = {
    "spectral_norm/max": "max_spectral_norm",
    "sharpness/lambda_max": "sharpness",
    "gns/b_simple": "grad_noise_scale",
}


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class EpochRecorder(Callback):
    """Record per-epoch metrics of a fit into ``out_dir`` (``history.json``, ``history.csv``).

    The optimizer step is timed through ``torch.optim.Optimizer``'s step hooks (synchronising
    the GPU around it when the module is on one); the solver columns come from the optimizer's
    ``constraint_report()`` after every training batch.

    Args:
        out_dir: where the history files go (``None``: keep them in memory only).
        final_train_eval: after fit, measure loss and accuracy on the whole training set in eval
            mode (``train_eval_loss``, ``train_eval_acc`` in :attr:`final`).
        stop_on_nonfinite: stop training when the training loss is NaN/Inf (:attr:`diverged` is set).
    """

    def __init__(self, out_dir: str | None = None, final_train_eval: bool = False, stop_on_nonfinite: bool = True):
        self.out_dir = Path(out_dir) if out_dir else None
        self.final_train_eval = final_train_eval
        self.stop_on_nonfinite = stop_on_nonfinite
        self.history: list[dict[str, Any]] = []
        self.diverged = False
        self.final: dict[str, Any] = {}
        self._hooks: list[RemovableHandle] = []
        self._sync = False
        self._step_start = 0.0
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._epoch_start = time.perf_counter()
        self._step_times: list[float] = []
        self._solver: dict[str, list[float]] = {}

    # -- timing of optimizer.step ---------------------------------------------------------
    def _before_step(self, *_: Any) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._step_start = time.perf_counter()

    def _after_step(self, *_: Any) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self._step_times.append(time.perf_counter() - self._step_start)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync = pl_module.device.type == "cuda"
        for optimizer in trainer.optimizers:
            self._hooks += [optimizer.register_step_pre_hook(self._before_step),
                            optimizer.register_step_post_hook(self._after_step)]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_epoch()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and self.stop_on_nonfinite and not math.isfinite(_scalar(loss)):
            self.diverged = True
            trainer.should_stop = True
        for optimizer in trainer.optimizers:
            report = getattr(optimizer, "constraint_report", None)
            if not callable(report):
                continue
            maxima: dict[str, float] = {}
            for entry in report().values():
                for key, value in entry.items():
                    if math.isfinite(value):
                        maxima[key] = max(maxima.get(key, -math.inf), value)
            for key, value in maxima.items():
                self._solver.setdefault(key, []).append(value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        for key, name in (("train/loss_epoch", "train_loss"), ("train/acc", "train_acc"),
                          ("val/loss", "val_loss"), ("val/acc", "val_acc")):
            row[name] = metrics.get(key, math.nan)
        for callback in trainer.callbacks:
            for key, value in getattr(callback, "last_metrics", {}).items():
                if key in DIAGNOSTIC_KEYS:
                    row[DIAGNOSTIC_KEYS[key]] = value
                elif key.startswith("spectral_norm/"):
                    row[key] = value
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        row["lr"] = float(groups[0]["lr"]) if groups else math.nan
        row["time"] = time.perf_counter() - self._epoch_start
        if self._step_times:
            row["step_time_ms"] = 1000.0 * sum(self._step_times) / len(self._step_times)
        for key, values in self._solver.items():
            row[f"solver_{key}"] = sum(values) / len(values)
        if not math.isfinite(row["train_loss"]):
            self.diverged = self.diverged or self.stop_on_nonfinite
        self.history.append(row)
        self.save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        with unsharded_weights(pl_module):  # on every rank: a sharded weight is gathered to its full matrix
            self.final = {"spectral_norms": compute_spectral_norms(pl_module)}
        if self.final_train_eval and trainer.datamodule is not None:
            self.final.update(evaluate(pl_module, trainer.datamodule.train_dataloader()))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def save(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history = MetricsLogger(self.history)
        history.save_json(self.out_dir / "history.json")
        history.save_csv(self.out_dir / "history.csv")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "diverged": self.diverged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.diverged = bool(state_dict.get("diverged", False))


@torch.no_grad()
def evaluate(pl_module: pl.LightningModule, loader: Any) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``pl_module`` over ``loader`` in eval mode."""
    was_training = pl_module.training
    pl_module.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        logits = pl_module(x)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    pl_module.train(was_training)
    return {"train_eval_loss": loss_sum / max(total, 1), "train_eval_acc": correct / max(total, 1)}
