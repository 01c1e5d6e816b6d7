"""Your own data: a plain ``LightningDataModule`` of 1-D signals (not images) trains an ``MLP``
through the real CLI and from Python; the data module sizes the network, nothing is stated twice."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import yaml
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.cli import cli_main
from lightning_spectral.data import data_arguments
from lightning_spectral.models import MLP
from lightning_spectral.module import SpectralModule


class SineWaves(LightningDataModule):
    """Noisy sine waves of 1, 2 or 3 cycles per window (the class), random phase and amplitude
    in [0.5, 1.5], Gaussian noise of std ``noise``; 80 % train, 20 % validation.

    Declares ``num_classes`` only: the input shape, ``(length,)``, is read from one batch.
    """

    num_classes = 3

    def __init__(self, samples: int = 600, length: int = 40, noise: float = 0.3, batch_size: int = 32) -> None:
        super().__init__()
        self.samples, self.length, self.noise, self.batch_size = samples, length, noise, batch_size
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (self.samples,), generator=g)
        t = torch.arange(self.length) / self.length
        phase = 2 * math.pi * torch.rand(self.samples, 1, generator=g)
        amplitude = 0.5 + torch.rand(self.samples, 1, generator=g)
        x = amplitude * torch.sin(2 * math.pi * (y[:, None] + 1) * t + phase)
        x = x + self.noise * torch.randn(x.shape, generator=g)
        split = int(0.8 * self.samples)
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


CHANCE = 1 / 3


def test_the_data_module_sizes_the_network() -> None:
    assert data_arguments(MLP, SineWaves()) == {"num_classes": 3, "input_shape": (40,), "in_features": 40}
    assert data_arguments(SpectralModule, SineWaves()) == {"num_classes": 3}


def test_signals_train_through_the_cli(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_args": {  # no class_path: SpectralModule, the default
            "net": {"class_path": "lightning_spectral.models.MLP", "init_args": {"hidden_sizes": [64]}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        }},
        "data": {"class_path": f"{__name__}.SineWaves"},
    }
    (tmp_path / "signals.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(tmp_path / "signals.yaml")])
    assert isinstance(cli.model, SpectralModule)
    assert cli.model.net.layers[1].in_features == 40 and cli.model.net.layers[-1].out_features == 3
    assert cli.model.hparams["net"]["init_args"]["input_shape"] == [40]  # recorded: the checkpoint rebuilds it
    acc = cli.trainer.callback_metrics["val/acc"].item()
    assert acc > CHANCE + 0.3, acc


def test_signals_train_from_python() -> None:
    torch.manual_seed(0)
    data = SineWaves()
    model = SpectralModule(MLP(**data_arguments(MLP, data), hidden_sizes=[64]),  # the class count: once, from the data
                           optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    assert model.hparams["num_classes"] == model.val_acc.num_classes == 3  # read from the network
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    acc = trainer.callback_metrics["val/acc"].item()
    assert acc > CHANCE + 0.3, acc
