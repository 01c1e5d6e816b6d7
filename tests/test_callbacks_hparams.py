"""HParamsSummary: one HParams entry per fit, read back from the event file."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import HParamsSummary

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, :3] * 2).argmax(1)


class Classifier(pl.LightningModule):
    """A foreign module: automatic optimization, torch's SGD and StepLR, its own hyperparameters."""

    def __init__(self, width: int = 16, lr: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.net(batch[0])
        self.log("val/loss", F.cross_entropy(logits, batch[1]))
        self.log("val/acc", (logits.argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=4)}

    def train_dataloader(self):
        return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)


def plugin_content(events, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(events.PluginTagToContent("hparams")[tag])


def test_one_entry_with_the_resolved_settings_and_final_and_best_validation_metrics(tmp_path):
    pl.seed_everything(3)
    logger = TensorBoardLogger(tmp_path, name="tb")  # default_hp_metric=True: its placeholder must not win
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=logger, callbacks=[HParamsSummary({"note": "x"})],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(Classifier())
    events = EventAccumulator(logger.log_dir)
    events.Reload()

    start = plugin_content(events, "_hparams_/session_start_info").session_start_info.hparams
    assert start["optimizer"].string_value == "SGD"
    assert start["optimizer/lr"].number_value == pytest.approx(0.2)
    assert start["optimizer/momentum"].number_value == pytest.approx(0.9)
    assert start["scheduler"].string_value == "StepLR" and start["scheduler/step_size"].number_value == 4
    assert start["lr/pg0"].number_value == pytest.approx(0.2)  # the initial lr, not the decayed one
    assert start["model"].string_value == "Classifier" and start["model/width"].number_value == 16
    assert start["max_epochs"].number_value == 3 and start["seed"].number_value == 3
    assert start["note"].string_value == "x"
    experiment = plugin_content(events, "_hparams_/experiment").experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert metric_tags == {"hparams/final_val_acc", "hparams/best_val_acc", "hparams/final_val_loss",
                           "hparams/best_val_loss", "hparams/final_train_loss"}  # no hp_metric placeholder

    def last(tag):
        return events.Scalars(tag)[-1].value

    accuracies = [e.value for e in events.Scalars("val/acc")]
    losses = [e.value for e in events.Scalars("val/loss")]
    assert len(accuracies) == 3
    assert last("hparams/final_val_acc") == accuracies[-1] and last("hparams/best_val_acc") == max(accuracies)
    assert last("hparams/final_val_loss") == losses[-1] and last("hparams/best_val_loss") == min(losses)
    assert last("hparams/final_train_loss") == last("train/loss")
    assert "optimizer" not in logger.hparams  # hparams.yaml keeps what Lightning wrote


def test_hparams_must_be_a_dict():
    with pytest.raises(TypeError, match="hparams must be a dict"):
        HParamsSummary(["lr"])


class Diverges(Classifier):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise FloatingPointError("the loss is NaN")
        return super().training_step(batch, batch_idx)


def test_a_fit_stopped_by_an_error_keeps_its_entry_with_the_validations_it_had(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=logger, callbacks=[HParamsSummary()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(), pytest.raises(FloatingPointError):
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(Diverges())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert plugin_content(events, "_hparams_/session_start_info").session_start_info.hparams["optimizer"].string_value == "SGD"
    (accuracy,) = events.Scalars("val/acc")  # one validation, after the first epoch
    assert events.Scalars("hparams/final_val_acc")[-1].value == accuracy.value
