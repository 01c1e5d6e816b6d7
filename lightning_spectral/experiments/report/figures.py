"""The figure functions shared by the report sections: pyplot without a display, mean ± std
curves over seeds, a log axis where values span orders of magnitude, and saving a figure as a
PNG (150 dpi) and an SVG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_spectral.experiments.files import inside
from lightning_spectral.experiments.spec import check_name

DPI = 150
LEGEND_SIZE = 9  # points; smaller legends are unreadable in a page at 150 dpi
SPAN_FOR_LOG = 20.0  # a positive axis whose values span more than this factor gets a log scale


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(group: dict[str, Any], key: str) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and std over seeds of the per-epoch metric ``key`` of a series."""
    xs, ms, ss = [], [], []
    for mean, std in zip(group["curves"]["mean"], group["curves"]["std"]):
        if key in mean and "epoch" in mean:
            xs.append(mean["epoch"])
            ms.append(mean[key])
            ss.append(std.get(key, math.nan))
    return xs, ms, ss


def plot_band(ax, xs, ms, ss, **kwargs) -> None:
    """The mean as a line and ± one std as a band (no band where a std is missing, e.g. one seed)."""
    line = ax.plot(xs, ms, **kwargs)[0]
    lo = [m - s for m, s in zip(ms, ss) if math.isfinite(s)]
    if len(lo) == len(ms) and ms:
        ax.fill_between(xs, lo, [m + s for m, s in zip(ms, ss)], color=line.get_color(), alpha=0.2)


def wants_log(values) -> bool:
    """True when the finite values are all positive and span more than :data:`SPAN_FOR_LOG`
    (e.g. 7400 ms beside 60 ms: on a linear axis the small ones vanish)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > SPAN_FOR_LOG


def legend(ax, **kwargs) -> None:
    """A readable legend (:data:`LEGEND_SIZE` points), only where something is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=kwargs.pop("fontsize", LEGEND_SIZE), **kwargs)


def figure_path(report_dir: Path, study_name: str, what: str) -> Path:
    """``<report_dir>/<study>_<what>.png``, proven to lie in ``report_dir`` (every section's figures)."""
    return inside(report_dir, f"{check_name(study_name, 'the study name')}_{what}.png", what="a figure")


def save_figure(fig, path: Path, dpi: int = DPI) -> str:
    """Lay out, write ``path`` as a PNG (``dpi``, at least :data:`DPI`) and beside it the same
    figure as an SVG, close the figure; returns the PNG's file name. Panels that drew nothing
    (a metric no run recorded) are removed rather than shown empty."""
    empty = [ax for ax in fig.axes if not ax.has_data()]
    if len(empty) < len(fig.axes):
        for ax in empty:
            fig.delaxes(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=max(dpi, DPI))
    fig.savefig(path.with_suffix(".svg"))
    pyplot().close(fig)
    return path.name


def log_figures_to_tensorboard(report_dir: Path, names: list[str], study_name: str) -> Path | None:
    """Write the report's PNG figures ``names`` (files in ``report_dir``) as images to a fresh
    TensorBoard log in ``report_dir/tensorboard`` (tag ``<study>/<figure>``), so that
    ``tensorboard --logdir logs/studies/<study>`` shows them beside every run's curves and
    HParams. Returns the log directory (``None`` when there is no figure)."""
    import shutil

    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    pngs = [report_dir / name for name in names if (report_dir / name).is_file()]
    if not pngs:
        return None
    log_dir = report_dir / "tensorboard"
    shutil.rmtree(log_dir, ignore_errors=True)  # a re-collect replaces the figures instead of adding a second copy
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for png in pngs:
            image = np.asarray(Image.open(png).convert("RGB"))
            writer.add_image(f"{study_name}/{png.stem}", image, dataformats="HWC")
    finally:
        writer.close()
    return log_dir
