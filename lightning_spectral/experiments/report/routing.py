"""The routing section every report ends with: which rule updated which parameter, per series.

Each run records the table of its fit's optimizer
(:func:`~lightning_spectral.optim.routing_table`); series whose tables agree up to the
learning rate and weight decay share one table, so a page says what ran ("Grassmann" on the
head only, the 64×64 layers on the AdamW fallback) instead of what the series' label suggests.
"""

from __future__ import annotations

from typing import Any

DROPPED = ("lr", "weight_decay")  # set per series by the study; shown in its config, not here


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def without_columns(table: str, drop: tuple[str, ...] = DROPPED) -> str:
    """The Markdown ``table`` without the columns whose header is in ``drop``, re-padded."""
    rows = [_cells(line) for line in table.strip().splitlines() if line.strip().startswith("|")]
    if not rows:
        return table.strip()
    keep = [i for i, name in enumerate(rows[0]) if name not in drop]
    rows = [[r[i] for i in keep if i < len(r)] for r in rows]
    widths = [max(len(r[c]) for r in rows if c < len(r)) for c in range(len(keep))]
    rows[1] = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows)


def routing_section(groups: dict[str, dict[str, Any]], label) -> str:
    """``## Parameter routing``: one table per distinct routing, naming the series that share it."""
    tables: dict[str, list[str]] = {}
    missing: list[str] = []
    for g in groups.values():
        table = next((r["routing"] for r in g["results"] if r.get("routing")), None)
        if table is None:
            missing.append(label(g))
            continue
        tables.setdefault(without_columns(table), []).append(label(g))
    if not tables:
        return ""
    parts = ["## Parameter routing\n\nWhich rule updated which parameter, read from each run's optimizer "
             "(learning rates and weight decay are those of the series' config)."]
    for table, series in tables.items():
        parts.append(f"**{', '.join(series)}**\n\n{table}")
    if missing:
        parts.append(f"No routing recorded for: {', '.join(missing)} (runs made before it was recorded).")
    return "\n\n".join(parts)
