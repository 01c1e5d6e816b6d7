"""``metric_grid``: per-epoch curves (validation loss and accuracy, max spectral norm, sharpness,
gradient noise scale, training loss: those recorded), mean ± std over seeds per series."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import (curve, figure_path, legend, plot_band, pyplot,
                                                            save_figure, wants_log)
from lightning_spectral.experiments.report.stats import label

GRID_METRICS = (
    ("val_loss", "Validation loss"), ("val_acc", "Validation accuracy"), ("max_spectral_norm", "Max spectral norm"),
    ("sharpness", "Sharpness (λ_max)"), ("grad_noise_scale", "Gradient noise scale (B_simple)"),
    ("train_loss", "Training loss"),
)


def metric_grid(groups, path: Path, title: str, select=None) -> None:
    """One panel per metric that some series recorded (at most 3 per row), a log axis where its
    values span orders of magnitude (:func:`~.figures.wants_log`)."""
    plt = pyplot()
    chosen = [g for g in groups.values() if select is None or select(g)]
    shown = [(key, name) for key, name in GRID_METRICS if any(curve(g, key)[0] for g in chosen)] or [GRID_METRICS[0]]
    cols = 2 if len(shown) == 4 else min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.5 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flatten(), shown):
        for g in chosen:
            xs, ms, ss = curve(g, key)
            if xs:
                plot_band(ax, xs, ms, ss, label=label(g), linewidth=1.6)
        ax.set_xlabel("Epoch")
        ax.set_title(name, fontsize=10)
        if wants_log([m for g in chosen for m in curve(g, key)[1]]):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    legend(axes.flatten()[0])
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def section_metric_grid(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    path = figure_path(report_dir, study.name, "metrics")
    name = path.name
    metric_grid(groups, path, opts.get("title", f"{study.name}: per-epoch metrics (mean ± std)"))
    return (f"## Per-epoch metrics\n\nLines are the mean over seeds, bands ± one std.\n\n"
            f"![metrics]({name})"), [name]
