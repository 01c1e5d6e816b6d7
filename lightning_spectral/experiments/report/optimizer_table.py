"""``optimizer_table``: ``Optimizer | Loss | Accuracy | Notes``, best accuracy first (also
``table.md`` and ``table.json``)."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.files import write_json
from lightning_spectral.experiments.report.stats import fmt, fmt_g, label, md_table


def section_optimizer_table(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """``Optimizer | Loss | Accuracy | Notes``, sorted by accuracy (best first); the best loss and accuracy in bold."""
    notes = opts.get("notes") or {}
    gs = sorted(groups.values(), key=lambda g: -(g["stats"].get("final_val_acc", {}).get("mean", -1)
                                                   if math.isfinite(g["stats"].get("final_val_acc", {}).get("mean", math.nan)) else -1))
    best_acc = max((g for g in gs), key=lambda g: g["stats"].get("final_val_acc", {}).get("mean", -1), default=None)
    best_loss = min((g for g in gs if g["stats"].get("final_train_loss", {}).get("n")),
                    key=lambda g: g["stats"]["final_train_loss"]["mean"], default=None)
    rows, table_json = [], []
    for g in gs:
        s = g["stats"]
        name, loss, acc = label(g), fmt_g(s.get("final_train_loss")), fmt(s.get("final_val_acc"), 100) + "%"
        if g is best_acc:
            acc = f"**{acc}**"
        if g is best_loss:
            loss = f"**{loss}**"
        note = notes.get(name, "")
        if g["diverged"]:
            note = (note + "; " if note else "") + f"{g['diverged']}/{g['n']} runs diverged"
        rows.append([f"**{name}**" if g is best_acc else name, loss, acc, note])
        table_json.append({"optimizer": name, "loss": s.get("final_train_loss"), "accuracy": s.get("final_val_acc"),
                           "notes": note, "seeds": g["seeds"]})
    write_json(report_dir / "table.json", table_json)
    (report_dir / "table.md").write_text(md_table(["Optimizer", "Loss", "Accuracy", "Notes"], rows) + "\n")
    return ("## Optimizer comparison\n\nLoss: mean training loss of the last epoch; accuracy: "
            "held-out accuracy after the last epoch; mean ± std over seeds.\n\n"
            + md_table(["Optimizer", "Loss", "Accuracy", "Notes"], rows)), []
