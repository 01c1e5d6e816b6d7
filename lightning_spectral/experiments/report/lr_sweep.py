"""``lr_sweep``: held-out (and training-set) accuracy against the learning rate, per method."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import figure_path, legend, pyplot, save_figure
from lightning_spectral.experiments.report.stats import fmt, md_table


def section_lr_sweep(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """One row per learning rate, ordered by its value (the axis's labels may be any names)."""
    plt = pyplot()
    lr_axis, m_axis = opts.get("lr_axis", "lr"), opts.get("method_axis", "method")
    methods = list(dict.fromkeys(g["axes"][m_axis] for g in groups.values()))
    fig, ax = plt.subplots(figsize=(8, 5))
    table: dict[str, dict[str, str]] = {}  # lr label -> method -> cell
    lr_value: dict[str, float] = {}  # lr label -> learning rate
    for method in methods:
        gs = sorted([g for g in groups.values() if g["axes"][m_axis] == method], key=lambda g: float(g["values"][lr_axis]))
        xs = [float(g["values"][lr_axis]) for g in gs]
        for key, style in (("final_val_acc", "o-"), ("final_train_eval_acc", "s--")):
            stats = [g["stats"].get(key) for g in gs]
            if not any(stats):
                continue
            ax.errorbar(xs, [s["mean"] * 100 if s else math.nan for s in stats],
                        yerr=[s["std"] * 100 if s and math.isfinite(s["std"]) else 0 for s in stats],
                        fmt=style, capsize=2, label=f"{method} ({'test' if key == 'final_val_acc' else 'train'})",
                        alpha=1.0 if key == "final_val_acc" else 0.6)
        best = max(gs, key=lambda g: g["stats"]["final_val_acc"]["mean"] if g["stats"].get("final_val_acc", {}).get("n") else -1)
        if best["stats"].get("final_val_acc", {}).get("n"):
            ax.annotate(f"{best['stats']['final_val_acc']['mean'] * 100:.1f}%",
                        (float(best["values"][lr_axis]), best["stats"]["final_val_acc"]["mean"] * 100),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
        for g in gs:
            s = g["stats"]
            lr_value[g["axes"][lr_axis]] = float(g["values"][lr_axis])
            table.setdefault(g["axes"][lr_axis], {})[method] = (
                f"{fmt(s.get('final_val_acc'), 100)} ({fmt(s.get('final_train_eval_acc'), 100)})")
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel("Accuracy %")
    ax.set_title("Learning-rate sweep: test (solid) and train (dashed) accuracy")
    legend(ax)
    ax.grid(True, alpha=0.3)
    name = save_figure(fig, figure_path(report_dir, study.name, "lr_sweep"))
    rows = [[lr, *[table[lr].get(m, "–") for m in methods]] for lr in sorted(table, key=lr_value.__getitem__)]
    return (f"## Learning-rate sweep\n\n![lr sweep]({name})\n\nHeld-out accuracy % (training-set accuracy % in eval "
            f"mode), mean ± std over seeds:\n\n{md_table(['lr', *methods], rows)}"), [name]
