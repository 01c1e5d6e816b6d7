"""``metric_grid``: the 2×3 grid of per-epoch curves (validation loss and accuracy, max spectral
norm, sharpness, gradient noise scale, training loss), mean ± std over seeds per series."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import curve, legend, plot_band, pyplot, save_figure
from lightning_spectral.experiments.report.stats import label

GRID_METRICS = (
    ("val_loss", "Validation loss", False), ("val_acc", "Validation accuracy", False),
    ("max_spectral_norm", "Max spectral norm", False), ("sharpness", "Sharpness (λ_max)", True),
    ("grad_noise_scale", "Gradient noise scale (B_simple)", True), ("train_loss", "Training loss", True),
)


def metric_grid(groups, path: Path, title: str, select=None) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    chosen = [g for g in groups.values() if select is None or select(g)]
    for ax, (key, name, log) in zip(axes.flatten(), GRID_METRICS):
        for g in chosen:
            xs, ms, ss = curve(g, key)
            if xs:
                plot_band(ax, xs, ms, ss, label=label(g), linewidth=1.6)
        ax.set_xlabel("Epoch")
        ax.set_title(name, fontsize=10)
        if log and all(v > 0 for g in chosen for v in curve(g, key)[1] if math.isfinite(v)) and any(
                curve(g, key)[0] for g in chosen):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    legend(next((ax for ax in axes.flatten() if ax.has_data()), axes[0, 0]))
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def section_metric_grid(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    name = f"{study.name}_metrics.png"
    metric_grid(groups, report_dir / name, opts.get("title", f"{study.name}: per-epoch metrics (mean ± std)"))
    return (f"## Per-epoch metrics\n\nLines are the mean over seeds, bands ± one std.\n\n"
            f"![metrics]({name})"), [name]
