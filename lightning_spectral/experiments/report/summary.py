"""The summary table every training study ends with: one row per series, mean ± std over seeds;
columns no run recorded (accuracy in a language-model study, sharpness when it is off) are left out."""

from __future__ import annotations

from typing import Any

from lightning_spectral.experiments.report.stats import fmt, fmt_g, label, md_table


def summary_section(groups, opts: dict[str, Any]) -> str:
    extra = opts.get("columns", [])
    header = ["Series", "Seeds", "Val acc % (final)", "Val acc % (best)", "Val loss", "Train loss",
              "Max σ (final)", "Sharpness", "GNS", "ms/step", *[c["title"] for c in extra]]
    rows = []
    for g in groups.values():
        s = g["stats"]
        n = f"{g['n']}" + (f" ({g['diverged']} diverged)" if g["diverged"] else "")
        row = [label(g), n, fmt(s.get("final_val_acc"), 100), fmt(s.get("best_val_acc"), 100),
               fmt(s.get("final_val_loss"), digits=3), fmt(s.get("final_train_loss"), digits=3),
               fmt(s.get("final_max_spectral_norm"), digits=3), fmt_g(s.get("final_sharpness")),
               fmt_g(s.get("final_grad_noise_scale")), fmt(s.get("mean_step_time_ms"), digits=1)]
        row += [fmt_g(s.get(c["key"])) for c in extra]
        rows.append(row)
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] != "–" for row in rows)]  # no all-empty column
    return "## Summary (mean ± std over seeds, final epoch)\n\n" + md_table([header[i] for i in keep],
                                                                         [[row[i] for i in keep] for row in rows])
