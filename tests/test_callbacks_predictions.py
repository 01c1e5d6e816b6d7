"""PredictionWriter: every prediction of trainer.predict, with its dataset index, in one file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import PredictionWriter


class Doubler(LightningModule):
    """Predicts 2x for each input row; a second dataloader gets texts."""

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        (x,) = batch
        return 2 * x if dataloader_idx == 0 else [f"row {int(v[0])}" for v in x]


def predict(tmp_path: Path, writer: PredictionWriter, loaders: int = 1):
    data = torch.arange(14.0).reshape(7, 2)
    dataloaders = [DataLoader(TensorDataset(data), batch_size=3) for _ in range(loaders)]
    trainer = Trainer(default_root_dir=tmp_path, logger=False, callbacks=[writer], enable_progress_bar=False,
                      accelerator="cpu")
    trainer.predict(Doubler(), dataloaders=dataloaders if loaders > 1 else dataloaders[0])
    return data


def test_pt_file_loads_with_weights_only(tmp_path: Path) -> None:
    data = predict(tmp_path, PredictionWriter(str(tmp_path / "out" / "p.pt")))
    (written,) = torch.load(tmp_path / "out" / "p.pt", weights_only=True)
    assert torch.equal(written["indices"], torch.arange(7)) and torch.equal(written["predictions"], 2 * data)


def test_csv_with_two_dataloaders_and_non_scalar_rows(tmp_path: Path) -> None:
    writer = PredictionWriter()
    data = predict(tmp_path, writer, loaders=2)
    assert writer.written == tmp_path / "predictions.csv"  # trainer.log_dir is the root without a logger
    with writer.written.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["dataloader", "index", "prediction"] and len(rows) == 1 + 2 * 7
    assert [json.loads(p) for _, _, p in rows[1:8]] == (2 * data).tolist()
    assert rows[8:] == [["1", str(i), f"row {2 * i}"] for i in range(7)]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match=r"must end in one of \('.csv', '.pt'\)"):
        PredictionWriter("predictions.json")
