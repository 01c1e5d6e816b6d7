"""``ConstraintMonitor``: what manifold optimizers report about their constraints."""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_spectral.callbacks._base import DiagnosticCallback


class ConstraintMonitor(DiagnosticCallback):
    """Log each optimizer's ``constraint_report()``: per parameter, e.g. distance to the manifold and inner-solver work.

    Duck-typed: an optimizer (the raw one, as in ``trainer.optimizers``) qualifies if it has a
    method ``constraint_report() -> dict[str, dict[str, float]]`` mapping parameter name to
    metrics such as ``{"constraint": distance_to_manifold, "inner_iterations": n,
    "inner_residual": r}``, describing its latest step (the budgeted optimizers add
    ``closed_form``: 1 when the step was a formula and the solver never iterated, so a run named
    after an iterative solver shows whether it did). Without one it warns once and does nothing.

    Parameters are named as in the module (``net.0.weight``) when the method takes ``names`` (a
    ``{parameter: name}`` map, given from ``pl_module.named_parameters()``; every package
    optimizer's does), else as the optimizer names them.

    Keys: ``constraint/<param>/<metric>`` and ``constraint/max/<metric>`` (the maximum over
    parameters: ``constraint/max/closed_form`` is 1 when any layer's step was closed form); with several reporting optimizers the parameter names get an ``opt<i>-`` prefix.
    Read at the start of the next batch, so the report of the update that produced the
    parameters after ``s`` steps is logged at step ``s``.

    Args:
        every_n_steps: log every N optimizer steps (default 50), or
        every_n_epochs: at the end of every N-th epoch.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        self._reporters: list[tuple[int, Any]] = []
        self._names: dict[Any, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._reporters = [
            (i, opt) for i, opt in enumerate(trainer.optimizers) if callable(getattr(opt, "constraint_report", None))
        ]
        self._names = {p: name for name, p in pl_module.named_parameters()}
        if not self._reporters:
            rank_zero_warn(
                "ConstraintMonitor: no optimizer has a `constraint_report()` method "
                f"({', '.join(type(o).__name__ for o in trainer.optimizers) or 'no optimizers'}); nothing will be logged."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._reporters, self._names = [], {}

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        maxima: dict[str, float] = {}
        for i, optimizer in self._reporters:
            prefix = f"opt{i}-" if len(self._reporters) > 1 else ""
            for param, report in _report(optimizer, self._names).items():
                for key, value in report.items():
                    value = float(value)
                    metrics[f"constraint/{prefix}{param}/{key}"] = value
                    if not math.isnan(value):
                        maxima[key] = max(maxima.get(key, -math.inf), value)
        metrics.update({f"constraint/max/{key}": value for key, value in maxima.items()})
        return metrics


def _report(optimizer: Any, names: dict[Any, str]) -> dict[str, dict[str, float]]:
    """``optimizer.constraint_report()``, given the module's parameter names when it takes them."""
    if "names" in inspect.signature(optimizer.constraint_report).parameters:
        return optimizer.constraint_report(names=names)
    return optimizer.constraint_report()
