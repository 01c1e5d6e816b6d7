"""``MetricsLogger``: an in-memory history of metric rows with JSON/CSV export and seed aggregation."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any


class MetricsLogger:
    """A list of dict rows (``history``), e.g. one per epoch: ``logger.log({"epoch": 1, "val_acc": 0.9})``."""

    def __init__(self, history: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.history: list[dict[str, Any]] = [dict(row) for row in history or []]

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Append one row (copied)."""
        self.history.append(dict(metrics))

    def columns(self) -> list[str]:
        """All keys, in first-seen order."""
        return list(dict.fromkeys(k for row in self.history for k in row))

    def to_dataframe(self) -> Any:
        """``history`` as a ``pandas.DataFrame`` (one row per logged dict; needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "MetricsLogger.to_dataframe needs pandas (pip install pandas); without it use .history "
                "(a list of dicts) or save_csv(path)"
            ) from err
        return pd.DataFrame(self.history, columns=self.columns())

    def save_json(self, path: str | os.PathLike) -> None:
        """Write ``history`` as a JSON list of objects (indent 2)."""
        with open(path, "w") as f:
            json.dump(self.history, f, indent=2)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> MetricsLogger:
        with open(path) as f:
            return cls(json.load(f))

    def save_csv(self, path: str | os.PathLike) -> None:
        """Write ``history`` as CSV with the union of keys as header; missing cells stay empty."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns(), restval="")
            writer.writeheader()
            writer.writerows(self.history)

    @staticmethod
    def aggregate_seeds(loggers: Sequence[MetricsLogger]) -> dict[str, list[dict[str, float]]]:
        """Mean and sample std (ddof=1; NaN for one seed) of numeric values, row by row position.

        Rows are matched by index across loggers (run ``i`` of each seed); for each key the
        statistics use the loggers whose row has a numeric (non-bool) value there.
        Returns ``{"mean": [row, ...], "std": [row, ...]}``.
        """
        mean_rows: list[dict[str, float]] = []
        std_rows: list[dict[str, float]] = []
        for i in range(max((len(lg.history) for lg in loggers), default=0)):
            rows = [lg.history[i] for lg in loggers if i < len(lg.history)]
            mean_row, std_row = {}, {}
            for key in dict.fromkeys(k for row in rows for k in row):
                values = [
                    float(row[key])
                    for row in rows
                    if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
                ]
                if not values:
                    continue
                mu = sum(values) / len(values)
                mean_row[key] = mu
                n = len(values)
                std_row[key] = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
            mean_rows.append(mean_row)
            std_rows.append(std_row)
        return {"mean": mean_rows, "std": std_rows}
