"""Where a study writes (every path proven to lie under the directory the user named) and its
JSON and CSV files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from lightning_spectral.checkpoint import atomic_write
from lightning_spectral.experiments.spec import StudySpecError


class OutsideOutputError(StudySpecError):
    """A path a study would write that does not lie under the directory the user named."""


def inside(root: str | Path, *parts: str | Path, what: str = "a study's file") -> Path:
    """``root / parts...``, after proving that it lies under ``root``; else :class:`OutsideOutputError`.

    Both are made absolute and normalised (``..`` and ``.`` collapsed) before the comparison.
    Symlinks are not followed: one that the user placed under ``root`` (runs on a scratch disk) is
    their choice, while a name from a study file can bring neither a separator nor ``..``
    (:func:`~lightning_spectral.experiments.spec.check_name`), so the lexical answer is exact.
    """
    path = Path(root).joinpath(*parts)
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, target]) != base:
        raise OutsideOutputError(f"{what} {str(path)!r} would lie outside {str(root)!r} (it resolves to {target!r}); "
                                 "a study writes only under the directory it was given")
    return path


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
