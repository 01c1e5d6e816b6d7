"""``EpochRecorder``: the per-epoch rows, the solver columns read through ``constraint_report()``,
the step timing through the optimizer's step hooks (no patched ``optimizer.step``)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_spectral.callbacks import EpochRecorder
from lightning_spectral.data import DigitsDataModule, data_arguments
from lightning_spectral.models import MLP
from lightning_spectral.module import SpectralModule
from lightning_spectral.optim import MuonSGD

ROW_KEYS = {"epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time", "step_time_ms"}


class Reporting:
    """An optimizer stand-in whose ``constraint_report()`` returns the given reports in turn."""

    def __init__(self, reports: list[dict[str, dict[str, float]]]) -> None:
        self.reports = iter(reports)
        self.param_groups = [{"lr": 0.5}]

    def constraint_report(self) -> dict[str, dict[str, float]]:
        return next(self.reports)


def fake_trainer(optimizer, **metrics) -> SimpleNamespace:
    return SimpleNamespace(optimizers=[optimizer], callbacks=[], current_epoch=0, global_step=2, should_stop=False,
                           callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})


def test_solver_columns_are_epoch_means_of_the_per_step_maxima() -> None:
    reports = [{"a": {"inner_iterations": 2.0, "constraint": 1e-3},
                "b": {"inner_iterations": 5.0, "constraint": math.nan}},
               {"a": {"inner_iterations": 4.0, "inner_residual": 1e-6}}]
    recorder, trainer = EpochRecorder(), fake_trainer(Reporting(reports), **{"train/loss_epoch": 0.5, "val/acc": 0.8})
    recorder.on_train_epoch_start(trainer, None)
    for i in range(2):
        recorder.on_train_batch_end(trainer, None, torch.tensor(0.5), None, i)
    recorder.on_train_epoch_end(trainer, None)
    row = recorder.history[0]
    assert row["solver_inner_iterations"] == 4.5  # max over parameters at each step (5, then 4), then the mean
    assert row["solver_constraint"] == 1e-3 and row["solver_inner_residual"] == 1e-6  # NaN left out
    assert (row["epoch"], row["step"], row["lr"], row["train_loss"]) == (1, 2, 0.5, 0.5)
    assert row["val_acc"] == pytest.approx(0.8)
    assert math.isnan(row["val_loss"]) and "step_time_ms" not in row  # nothing logged, no step taken


def test_a_nonfinite_loss_stops_the_run() -> None:
    recorder, trainer = EpochRecorder(), fake_trainer(Reporting([{}]))
    recorder.on_train_batch_end(trainer, None, {"loss": torch.tensor(math.nan)}, None, 0)
    assert recorder.diverged and trainer.should_stop
    state = recorder.state_dict()
    other = EpochRecorder()
    other.load_state_dict(state)
    assert other.diverged and other.history == recorder.history


def test_a_fit_records_every_epoch_and_times_steps_through_hooks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64)
    model = SpectralModule(MLP(**data_arguments(MLP, data), hidden_sizes=[32]),
                           optimizer=functools.partial(MuonSGD, lr=0.05, spectral_budget=0.01,
                                                       inner_solver="frank_wolfe"))  # reports inner iterations
    recorder = EpochRecorder(out_dir=str(tmp_path))
    trainer = Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[recorder])
    trainer.fit(model, datamodule=data)
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks  # removed at fit end
    assert [row["epoch"] for row in recorder.history] == [1, 2] and recorder.history[-1]["step"] == 6
    for row in recorder.history:
        assert ROW_KEYS | {"solver_inner_iterations", "solver_inner_residual"} <= set(row)
        assert 0 < row["step_time_ms"] < 1000 * row["time"] / 3
        assert row["solver_inner_iterations"] >= 1
    assert json.loads((tmp_path / "history.json").read_text()) == recorder.history
    assert (tmp_path / "history.csv").read_text().count("\n") == 3
    assert set(recorder.final["spectral_norms"]) == {"net.layers.1", "net.layers.3"}
