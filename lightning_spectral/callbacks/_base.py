"""Shared machinery of the diagnostic callbacks: schedule, step convention, logging, loss protocol.

Step convention (all callbacks): a value logged at step ``s`` describes the parameters after
``s`` optimizer steps, and ``s`` is ``trainer.fit_loop.epoch_loop._batches_that_stepped``, the
step Lightning itself logs ``self.log`` values and ``LearningRateMonitor`` at. Measurements
run in ``on_train_batch_start`` (so a metric at step ``s`` sits beside the training loss of
the batch computed at the same parameters) or, per epoch, in ``on_train_epoch_end``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_spectral.diagnostics._utils import LossFn, xy_batch
from lightning_spectral.optim.sharded import is_sharded


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor shard (FSDP2, Lightning's ``ModelParallelStrategy``)."""
    return any(is_sharded(p) for p in module.parameters())


def refuse_sharded(callback: str, trainer: pl.Trainer, pl_module: nn.Module, why: str) -> None:
    """Raise on every rank (each sees the same sharded parameters, so none is left waiting in a collective)
    when ``pl_module``'s parameters are DTensor shards."""
    if has_sharded_parameters(pl_module):
        raise MisconfigurationException(
            f"{callback} does not support sharded (DTensor) parameters yet ({type(trainer.strategy).__name__}): "
            f"{why}. Remove {callback} or train with DDPStrategy (unsharded parameters)."
        )


@contextmanager
def unsharded_weights(module: nn.Module) -> Iterator[None]:
    """Every DTensor ``weight`` of ``module``'s submodules replaced by its full matrix (``full_tensor()``,
    detached) for reading, the shards put back afterwards. ``full_tensor`` is an all-gather: call it on
    every rank. Nothing changes for unsharded modules."""
    swapped = []
    try:
        for sub in module.modules():
            weight = sub._parameters.get("weight")
            if weight is not None and is_sharded(weight):
                sub._parameters["weight"] = weight.detach().full_tensor()
                swapped.append((sub, weight))
        yield
    finally:
        for sub, weight in swapped:
            sub._parameters["weight"] = weight


def log_step(trainer: pl.Trainer) -> int:
    """The logging step: optimizer steps completed (counted once per batch, like Lightning's loggers)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def batch_loss(pl_module: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """The loss of ``batch`` by the first of these that applies (see :func:`check_loss_protocol`):

    1. ``loss_fn(module, x, y)``, the callback's argument;
    2. the module's ``loss_for_batch(batch)``;
    3. ``module.criterion(module(x), y)`` on an ``(x, y)`` batch;
    4. with automatic optimization, ``module.training_step(batch, 0)``: a returned tensor, or a
       dict's ``"loss"``. It runs with ``self.log``/``self.log_dict`` silenced and every
       torchmetrics ``Metric`` of the module restored afterwards; the optimizers are not touched
       (an automatic-optimization ``training_step`` does not step them). Other side effects of
       ``training_step`` (a counter, a list of losses) happen again: such a module should define
       ``loss_for_batch``. Manual optimization steps inside ``training_step``, so it is never
       re-run.
    """
    if loss_fn is not None:
        return loss_fn(pl_module, *xy_batch(batch))
    if callable(getattr(pl_module, "loss_for_batch", None)):
        return pl_module.loss_for_batch(batch)
    if callable(getattr(pl_module, "criterion", None)) and _is_xy(batch):
        return pl_module.criterion(pl_module(batch[0]), batch[1])
    if _reruns_training_step(pl_module):
        with _quiet(pl_module):
            output = pl_module.training_step(batch, 0)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if isinstance(loss, Tensor) and loss.numel() == 1:
            return loss.reshape(())
        raise MisconfigurationException(
            f"{type(pl_module).__name__}.training_step returned {_describe(output)}; the diagnostic callbacks "
            "need a scalar tensor or a dict with a scalar 'loss'. Give the module `loss_for_batch(batch)` or "
            "pass `loss_fn(model, x, y)` to the callback."
        )
    raise MisconfigurationException(_needs_a_loss(type(pl_module).__name__, "this callback"))


def check_loss_protocol(callback: str, pl_module: nn.Module, loss_fn: LossFn | None) -> None:
    """Fail early unless :func:`batch_loss` has a way to get a loss from ``pl_module``."""
    if (
        loss_fn is None
        and not callable(getattr(pl_module, "loss_for_batch", None))
        and not callable(getattr(pl_module, "criterion", None))
        and not _reruns_training_step(pl_module)
    ):
        raise MisconfigurationException(_needs_a_loss(type(pl_module).__name__, callback))


def _needs_a_loss(module: str, callback: str) -> str:
    return (
        f"{callback} needs a loss, and {module} uses manual optimization, so its training_step (which steps "
        "the optimizer) cannot be re-run. Pass `loss_fn(model, x, y)` to the callback, or give "
        f"{module} a method `loss_for_batch(batch) -> Tensor` (mean loss, no side effects) or a "
        "`criterion(output, y)` attribute used with `(x, y)` batches."
    )


def _reruns_training_step(pl_module: nn.Module) -> bool:
    return bool(getattr(pl_module, "automatic_optimization", False)) and callable(
        getattr(pl_module, "training_step", None)
    )


def _is_xy(batch: Any) -> bool:
    return isinstance(batch, (list, tuple)) and len(batch) == 2


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a dict with keys {sorted(map(str, output))}"
    return repr(output) if output is None else f"a {type(output).__name__}"


@contextmanager
def _quiet(pl_module: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` as no-ops, and torchmetrics states put back afterwards."""
    saved_attrs = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved_metrics = [_metric_state(m) for m in metrics]
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            pl_module.__dict__.pop(name)
        pl_module.__dict__.update(saved_attrs)
        for metric, state in zip(metrics, saved_metrics):
            metric.__dict__.update(state)


def _metric_state(metric: Metric) -> dict[str, Any]:
    """A torchmetrics ``Metric``'s accumulated states (tensors cloned, lists copied), update count and
    caches: the attributes ``Metric.update``/``forward`` change (torchmetrics 1.x)."""
    state: dict[str, Any] = {}
    for name in (*metric._defaults, "_update_count", "_computed", "_forward_cache"):
        value = metric.__dict__.get(name)
        state[name] = value.clone() if isinstance(value, Tensor) else list(value) if isinstance(value, list) else value
    return state


class DiagnosticCallback(Callback):
    """Base class: runs ``measure`` every ``every_n_steps`` optimizer steps or every ``every_n_epochs`` epochs.

    Subclasses implement ``measure(trainer, pl_module, batch, step)`` returning scalar metrics,
    which are logged to every logger in ``trainer.loggers`` at ``step``, kept in ``last_metrics``
    and put in ``trainer.callback_metrics`` (so ``EarlyStopping``/``ModelCheckpoint`` can monitor
    them; under DDP rank 0's values are broadcast to every rank). Non-finite values are never
    logged (dropped with a warning). ``elapsed_s`` and ``num_measurements`` time the work (overhead = ``elapsed_s``
    over the fit's wall time).
    """

    default_every_n_steps: int = 50
    needs_batch: bool = False

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("set either every_n_steps or every_n_epochs, not both")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = (
            every_n_steps if every_n_steps is not None or every_n_epochs else self.default_every_n_steps
        )
        self.last_metrics: dict[str, float] = {}
        self.elapsed_s = 0.0
        self.num_measurements = 0
        self._last_step = -1
        self._epoch_batch: Any = None
        self._dropped: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            rank_zero_warn(f"{type(self).__name__}: the Trainer has no logger; values are kept in `last_metrics` only.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first diagnostic callback writes the layout of all of them (TensorBoard reads one per run).
        first = next(c for c in trainer.callbacks if isinstance(c, DiagnosticCallback))
        if first is self:
            write_layout(trainer, pl_module)

    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """``{chart title: [tag regex, ...]}``: the multi-line charts of this callback's values in the
        TensorBoard layout (:func:`write_layout`); none by default."""
        return {}

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int
    ) -> Mapping[str, float]:
        raise NotImplementedError

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        start = time.perf_counter()
        metrics = self._finite(dict(self.measure(trainer, pl_module, batch, step)))
        if trainer.world_size > 1:  # rank 0 measures; every rank's EarlyStopping/ModelCheckpoint sees its values
            metrics = trainer.strategy.broadcast(metrics, src=0)
        self.elapsed_s += time.perf_counter() - start
        self.num_measurements += 1
        self._last_step = step
        if metrics:
            self.last_metrics = metrics
            log_scalars(trainer, metrics, step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _finite(self, metrics: dict[str, float]) -> dict[str, float]:
        """Drop NaN/inf values (a logger or ``EarlyStopping`` would choke on them), warning once per key."""
        dropped = [k for k, v in metrics.items() if not math.isfinite(v)]
        new = [k for k in dropped if k not in self._dropped]
        if new:
            self._dropped.update(new)
            rank_zero_warn(f"{type(self).__name__}: non-finite values not logged: {new}")
        return {k: float(v) for k, v in metrics.items() if k not in dropped}

    def _step_due(self, step: int) -> bool:
        # `_last_step` skips repeats of a step value (gradient accumulation) and measured steps after resuming.
        return self.every_n_steps is not None and step % self.every_n_steps == 0 and step != self._last_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_epochs is not None:
            if self.needs_batch:
                self._epoch_batch = batch
            return
        step = log_step(trainer)
        if self._step_due(step):
            self._run(trainer, pl_module, batch, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self.needs_batch and self._epoch_batch is None:
            return
        batch, self._epoch_batch = self._epoch_batch, None
        self._run(trainer, pl_module, batch, log_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        """The last logged step, and the warm-start state of a subclass's ``tracker`` (power-iteration
        vectors), so a resumed run continues from the same vectors."""
        tracker = getattr(self, "tracker", None)
        return {"last_step": self._last_step, **(tracker.state_dict() if tracker is not None else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.load_state_dict(state_dict)


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger at ``step`` (loggers write on rank 0 only)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def histogram_writers(trainer: pl.Trainer) -> list[Callable[..., Any]]:
    """``add_histogram`` of each logger whose experiment has one (TensorBoard), on global rank 0 only."""
    if not trainer.is_global_zero:
        return []
    writers = (getattr(logger.experiment, "add_histogram", None) for logger in trainer.loggers)
    return [w for w in writers if callable(w)]



#: The category of the TensorBoard custom-scalars layout that holds the diagnostics' charts.
LAYOUT_CATEGORY = "diagnostics"


def write_layout(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[str]]:
    """The charts of every :class:`DiagnosticCallback` of ``trainer`` as one TensorBoard custom-scalars
    layout (category :data:`LAYOUT_CATEGORY`, each chart a ``Multiline`` of tag regexes, matched from
    the start of a tag), written on global rank 0 to each logger whose experiment has
    ``add_custom_scalars`` (``TensorBoardLogger``'s ``SummaryWriter``). Returns the charts."""
    charts: dict[str, list[str]] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, DiagnosticCallback):
            charts.update(callback.charts(trainer, pl_module))
    if charts and trainer.is_global_zero:
        layout = {LAYOUT_CATEGORY: {title: ["Multiline", tags] for title, tags in charts.items()}}
        for logger in trainer.loggers:
            add = getattr(getattr(logger, "experiment", None), "add_custom_scalars", None)
            if callable(add):
                add(layout)
    return charts
