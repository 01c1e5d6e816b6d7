"""``lr_envelope`` (studies of kind ``lr_scan``): final loss per learning rate, converged or
diverged, and the largest stable learning rate of each optimizer."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lightning_spectral.experiments.report.figures import figure_path, legend, pyplot, save_figure
from lightning_spectral.experiments.report.stats import fmt_g, mean_std, md_table


def section_lr_envelope(study, results, report_dir: Path, opts) -> tuple[str, list[str]]:
    if not results:
        return "## Stability envelope\n\nNo finished runs yet.", []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5))
    by_opt: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for run, r in results:
        by_opt.setdefault(", ".join(run.axes.values()) or "all", []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = []
    ymax = max((l for rs in by_opt.values() for r in rs for l, c in zip(r["final_losses"], r["converged"]) if c),
               default=10.0)
    for (name, rs), color in zip(by_opt.items(), colors * 3):
        r = rs[0]
        lrs = r["lr_values"]
        conv = [sum(x["converged"][i] for x in rs) / len(rs) for i in range(len(lrs))]
        loss = [mean_std([x["final_losses"][i] for x in rs if x["converged"][i]])["mean"] for i in range(len(lrs))]
        ax.scatter([l for l, c in zip(lrs, conv) if c == 1], [v for v, c in zip(loss, conv) if c == 1], color=color,
                   marker="o", s=50, label=f"{name} (converged)")
        ax.scatter([l for l, c in zip(lrs, conv) if c < 1], [ymax * 1.3] * sum(c < 1 for c in conv), color=color,
                   marker="x", s=60, label=f"{name} (diverged)")
        ax.plot([l for l, c in zip(lrs, conv) if c == 1], [v for v, c in zip(loss, conv) if c == 1], color=color, alpha=0.4)
        ms = mean_std([x["max_stable_lr"] for x in rs])
        if ms["n"]:
            ax.axvline(ms["mean"], color=color, ls="--", alpha=0.7)
        unstable = sum(not math.isfinite(x["max_stable_lr"]) for x in rs)
        rows.append([name, str(len(rs)), fmt_g(ms) + (f" ({unstable} runs: none stable)" if unstable else ""),
                     f"{lrs[max([i for i, c in enumerate(conv) if c > 0], default=0)]:.3g}" if any(conv) else "–",
                     f"{min([l for l, c in zip(lrs, conv) if c < 1], default=math.nan):.3g}"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel(f"Final loss (after {study.scan.get('steps_per_lr', 50)} steps)")
    ax.set_title("Learning-rate stability envelope (× = diverged; dashed = max stable lr)")
    legend(ax, loc="upper left", ncol=2)
    ax.grid(True, alpha=0.3)
    name = save_figure(fig, figure_path(report_dir, study.name, "envelope"))
    table = md_table(["Optimizer", "Seeds", "Max stable lr (contiguous from the smallest)", "Largest lr converged (any seed)",
                      "Smallest lr diverged"], rows)
    per_lr_header = ["lr"] + list(by_opt)
    lr_rows = []
    first = next(iter(by_opt.values()))[0]["lr_values"]
    for i, lr in enumerate(first):
        cells = [f"{lr:.3g}"]
        for rs in by_opt.values():
            ok = [x for x in rs if x["converged"][i]]
            cells.append(f"{mean_std([x['final_losses'][i] for x in ok])['mean']:.3f}" + ("" if len(ok) == len(rs) else
                         f" ({len(rs) - len(ok)}/{len(rs)} diverged)") if ok else "diverged")
        lr_rows.append(cells)
    return (f"## Stability envelope\n\n![envelope]({name})\n\n{table}\n\nFinal training loss per lr "
            f"(mean over converged seeds):\n\n{md_table(per_lr_header, lr_rows)}"), [name]
