"""``budget``: final accuracy and spectral-norm trajectories against the spectral budget η."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import (curve, figure_path, legend, plot_band, pyplot,
                                                            save_figure, wants_log)
from lightning_spectral.experiments.report.stats import fmt, label, md_table


def section_budget(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = pyplot()
    axis = opts.get("axis", "budget")
    gs = sorted(groups.values(), key=lambda g: float(g["values"][axis]))
    colors = plt.cm.viridis([i / max(len(gs) - 1, 1) for i in range(len(gs))])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for g, c in zip(gs, colors):
        for ax, key in zip(axes[:2], ("val_acc", "max_spectral_norm")):
            xs, ms, ss = curve(g, key)
            plot_band(ax, xs, ms, ss, color=c, label=f"η={g['axes'][axis]}", linewidth=1.6)
    if wants_log([y for line in axes[1].get_lines() for y in line.get_ydata()]):
        axes[1].set_yscale("log")  # from tight budgets to none, the norms span orders of magnitude
    axes[0].set_title("Validation accuracy vs spectral budget")
    axes[1].set_title("Max spectral norm trajectory")
    for ax in axes[:2]:
        ax.set_xlabel("Epoch")
        legend(ax)
        ax.grid(True, alpha=0.3)
    finite = [g for g in gs if math.isfinite(float(g["values"][axis]))]
    b = [float(g["values"][axis]) for g in finite]
    m = [g["stats"]["final_val_acc"]["mean"] for g in finite]
    s = [g["stats"]["final_val_acc"]["std"] for g in finite]
    axes[2].errorbar(b, m, yerr=[v if math.isfinite(v) else 0 for v in s], fmt="o-", capsize=3)
    for key, text in (("baseline", "baseline"),):
        ref = next((g for g in gs if label(g) == opts.get(key)), None)
        if ref is not None:
            axes[2].axhline(ref["stats"]["final_val_acc"]["mean"], color="gray", ls="--", label=label(ref))
            legend(axes[2])
    axes[2].set_xscale("log")
    axes[2].set_xlabel("Spectral budget η")
    axes[2].set_title("Final validation accuracy vs budget")
    axes[2].grid(True, alpha=0.3)
    name = save_figure(fig, figure_path(report_dir, study.name, "budget"))
    rows = [[g["axes"][axis], fmt(g["stats"].get("final_val_acc"), 100), fmt(g["stats"].get("final_train_loss"), digits=3),
             fmt(g["stats"].get("final_max_spectral_norm"), digits=3)] for g in gs]
    table = md_table(["Budget η", "Val acc %", "Train loss", "Max σ (final)"], rows)
    return f"## Budget sweep\n\n![budget]({name})\n\n{table}", [name]
