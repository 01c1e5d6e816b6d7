"""Writing a study's JSON and CSV files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lightning_spectral.checkpoint import atomic_write


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (:func:`~lightning_spectral.checkpoint.atomic_write`: a reader never sees
    half a file; an interrupted write leaves the old one)."""
    text = json.dumps(obj, indent=2, default=str, allow_nan=True)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per dict; the columns are every key, in order of first appearance."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
