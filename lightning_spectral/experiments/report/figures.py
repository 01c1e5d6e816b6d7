"""The figure helpers shared by the report sections: pyplot without a display, mean ± std
curves over seeds, and saving a figure as a PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

DPI = 72


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


def save_figure(fig, path: Path, dpi: int = DPI) -> str:
    """Lay out, write ``path`` as a PNG and close the figure; returns the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path.name
