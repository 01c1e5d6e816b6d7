"""``PredictionWriter``: what ``predict`` returns, written to one file (Lightning's ``BasePredictionWriter``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

_FORMATS = (".csv", ".pt")


class PredictionWriter(BasePredictionWriter):
    """Write every prediction of ``trainer.predict`` with the index of its example in the dataset.

    ``path`` ends in ``.csv`` (one row per example: ``index,prediction``, with a ``dataloader``
    column when there are several; a prediction that is not one number or string is written as
    JSON) or ``.pt`` (``torch.save`` of ``{"indices": [...], "predictions": [...]}`` per dataloader,
    tensors and lists only: it loads with ``torch.load(weights_only=True)``). Unset, it is
    ``predictions.csv`` in the run's directory (``trainer.log_dir``). Under several processes each
    rank writes its own file, ``<stem>.rank<r><suffix>``. The ``predict`` command adds one when the
    config has no prediction writer; ``--out PATH`` names its file.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        if path is not None and Path(path).suffix not in _FORMATS:
            raise ValueError(f"PredictionWriter(path={path!r}): the file must end in one of {_FORMATS}")
        self.path = path
        self.written: Optional[Path] = None

    def file(self, trainer: pl.Trainer) -> Path:
        """Where this rank writes."""
        path = Path(self.path) if self.path is not None else Path(trainer.log_dir or trainer.default_root_dir) / \
            "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if len(batch_indices) == 1:  # one dataloader: Lightning nests the indices by dataloader, not the predictions
            predictions = [predictions]
        loaders = [([int(i) for batch in indices for i in batch], [p for batch in preds for p in _rows(batch)])
                   for preds, indices in zip(predictions, batch_indices)]
        path = self.file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt":
            torch.save([{"indices": torch.tensor(idx), "predictions": _stack(rows)} for idx, rows in loaders], path)
        else:
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                several = len(loaders) > 1
                writer.writerow(["dataloader", "index", "prediction"] if several else ["index", "prediction"])
                for loader, (indices, rows) in enumerate(loaders):
                    for index, row in zip(indices, rows):
                        writer.writerow([loader, index, _cell(row)] if several else [index, _cell(row)])
        self.written = path
        rank_zero_info(f"Predictions of {sum(len(idx) for idx, _ in loaders)} examples written to {path}")


def _rows(batch: Any) -> list[Any]:
    """One prediction per example of a batch (a tensor's first dimension, a list's items)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.detach().cpu().unbind(0)) if batch.ndim else [batch.detach().cpu()]
    return list(batch)


def _stack(rows: list[Any]) -> Any:
    if rows and all(isinstance(r, torch.Tensor) for r in rows):
        return torch.stack(rows)
    return rows


def _cell(row: Any) -> Any:
    if isinstance(row, torch.Tensor):
        row = row.item() if row.numel() == 1 else row.tolist()
    return row if isinstance(row, (int, float, str)) else json.dumps(row)
