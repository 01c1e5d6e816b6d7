"""``HParamsSummary``: one TensorBoard HParams entry per fit, the resolved settings with the final and best validation metrics."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

#: Scheduler attributes that are its running state, not its settings (private ones are left out anyway).
_SCHEDULER_STATE = frozenset({"base_lrs", "last_epoch", "verbose"})
#: Validation metrics where lower is better (their ``best_`` is the minimum; every other one's the maximum).
_LOWER_IS_BETTER = ("loss", "bpb", "ppl", "perplexity", "error")


def hparam_value(value: Any) -> Any:
    """A setting as the HParams view shows it: numbers, strings and booleans as they are, a one-element
    tensor as its number, anything else as one line of YAML (``None`` as ``None``: left out)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    except yaml.YAMLError:
        return repr(value)


def flat_hparams(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` pairs of a config value: a ``{class_path, init_args}`` as ``prefix`` = the class name
    and ``prefix/<arg>`` for its arguments, other mappings by ``prefix/<key>``, the rest by :func:`hparam_value`."""
    if isinstance(value, Mapping) and "class_path" in value:
        yield prefix, str(value["class_path"]).rsplit(".", 1)[-1]
        value = value.get("init_args") or {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not str(key).startswith("_"):
                yield from flat_hparams(f"{prefix}/{key}" if prefix else str(key), item)
        return
    yield prefix, hparam_value(value)


class HParamsSummary(Callback):
    """Write the fit's settings and results to TensorBoard's HParams view, as the studies' runs do.

    Settings (rank 0, read from the objects the fit runs with, so they are the resolved ones):
    ``optimizer`` (class name) and ``optimizer/<key>`` (its defaults), ``lr/<group>`` (each parameter
    group's initial learning rate), ``scheduler`` and ``scheduler/<setting>`` (``"none"`` without one),
    ``model`` and ``model/<key>`` (the module's saved hyperparameters, a network as ``model/net`` = its
    class and ``model/net/<arg>``; the optimizer and scheduler entries are the resolved ones above),
    ``data`` and ``data/<key>`` (the data module's hyperparameters), ``max_epochs``, ``max_steps``,
    ``seed`` (``seed_everything``'s, when set) and the ``hparams`` given here (the CLI gives the data
    module's config). Results, logged as ``hparams/<metric>`` at the end of the fit: for each
    ``val/<m>`` metric ``final_val_<m>`` (the last validation's) and ``best_val_<m>`` (the minimum of a
    loss, bits per byte or perplexity, the maximum of anything else), and ``final_train_loss``;
    written at the end of the fit, or when it stops on an exception.

    TensorBoard keeps the first HParams entry of a run, so the logger's placeholder ``hp_metric``
    entry (``TensorBoardLogger(default_hp_metric=True)``, Lightning's default) is switched off at
    fit start; the run's ``hparams.yaml`` is left as Lightning writes it. Other loggers get the
    results as metrics.

    Args:
        hparams: more settings to show, ``{key: value}``.
    """

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"hparams must be a dict of settings, got {type(hparams).__name__}")
        self.hparams = dict(hparams or {})
        self.final: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self._written = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = False
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger._default_hp_metric = False  # its placeholder entry would be the one TensorBoard shows

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val/") or not isinstance(value, (torch.Tensor, float, int)):
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            name = "val_" + key[len("val/"):].replace("/", "_")
            self.final[name] = value
            lower = any(word in name for word in _LOWER_IS_BETTER)
            previous = self.best.get(name)
            if previous is None or (value < previous if lower else value > previous):
                self.best[name] = value

    def results(self, trainer: pl.Trainer) -> dict[str, float]:
        """``hparams/<metric>``: the final and best validation metrics and the final training loss."""
        metrics = {f"hparams/final_{k}": v for k, v in self.final.items()}
        metrics.update({f"hparams/best_{k}": v for k, v in self.best.items()})
        train = trainer.callback_metrics.get("train/loss_epoch", trainer.callback_metrics.get("train/loss"))
        if train is not None and math.isfinite(float(train)):
            metrics["hparams/final_train_loss"] = float(train)
        return metrics

    def settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The resolved settings (see the class docstring), scalars or one-line text."""
        params: dict[str, Any] = {}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params["optimizer"] = type(optimizer).__name__
            params.update(flat_hparams("optimizer", {k: v for k, v in optimizer.defaults.items()
                                                     if not isinstance(v, torch.Tensor) or v.numel() == 1}))
            for j, group in enumerate(optimizer.param_groups):
                params[f"lr/{group.get('name', f'pg{j}')}"] = hparam_value(group.get("initial_lr", group["lr"]))
        schedulers = trainer.lr_scheduler_configs
        params["scheduler"] = type(schedulers[0].scheduler).__name__ if schedulers else "none"
        if schedulers:
            state = schedulers[0].scheduler.state_dict()
            params.update(flat_hparams("scheduler", {k: v for k, v in state.items() if k not in _SCHEDULER_STATE}))
        params["model"] = type(pl_module).__name__
        saved = {k: v for k, v in dict(pl_module.hparams).items() if k not in ("optimizer", "scheduler")}
        params.update(flat_hparams("model", saved))
        datamodule = trainer.datamodule
        if datamodule is not None:
            params["data"] = type(datamodule).__name__
            params.update(flat_hparams("data", dict(getattr(datamodule, "hparams", {}) or {})))
        params.update(max_epochs=trainer.max_epochs, max_steps=trainer.max_steps)
        if os.environ.get("PL_GLOBAL_SEED") is not None:
            params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
        params.update({key: hparam_value(value) for key, value in self.hparams.items()})
        return {k: v for k, v in params.items() if v is not None and k}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit that stops on an error (a diverged learning rate, an interruption) keeps its entry,
        with the validations it had."""
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._written:
            return
        self._written = True
        metrics = self.results(trainer)
        params = self.settings(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and metrics:
                write_hparams(logger, params, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"final": dict(self.final), "best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.final, self.best = dict(state_dict["final"]), dict(state_dict["best"])


def write_hparams(logger: TensorBoardLogger, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """The HParams entry (experiment, session start and end) that ``TensorBoardLogger.log_hyperparams``
    writes, without merging ``params`` into the logger's ``hparams.yaml``."""
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment._get_file_writer()
    for summary in hparams(dict(params), dict(metrics)):
        writer.add_summary(summary)
    writer.flush()
