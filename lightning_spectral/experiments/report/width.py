"""``width``: accuracy across width multipliers at a reference learning rate, and the best
learning rate per width (does it transfer?)."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import figure_path, legend, pyplot, save_figure
from lightning_spectral.experiments.report.stats import mean_std, md_table


def section_width(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = pyplot()
    w_axis, lr_axis, o_axis = opts.get("width_axis", "width"), opts.get("lr_axis", "lr"), opts.get("optimizer_axis", "optimizer")
    ref_lr = {k: str(v) for k, v in (opts.get("reference_lr") or {}).items()}
    optimizers = list(dict.fromkeys(g["axes"][o_axis] for g in groups.values()))
    widths = sorted({float(g["values"][w_axis]) for g in groups.values()})
    acc = {}  # (opt, lr_name, width) -> stat
    lrs: dict[str, list[tuple[float, str]]] = {o: [] for o in optimizers}
    for g in groups.values():
        o, lr, w = g["axes"][o_axis], g["axes"][lr_axis], float(g["values"][w_axis])
        acc[(o, lr, w)] = g["stats"].get("final_val_acc")
        if (float(g["values"][lr_axis]), lr) not in lrs[o]:
            lrs[o].append((float(g["values"][lr_axis]), lr))
    for o in optimizers:
        lrs[o].sort()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    spreads, rows, best_rows = {}, [], []
    for o in optimizers:
        lr = ref_lr.get(o, lrs[o][0][1])
        ys = [acc.get((o, lr, w)) for w in widths]
        m = [y["mean"] if y else math.nan for y in ys]
        e = [y["std"] if y and math.isfinite(y["std"]) else 0 for y in ys]
        axes[0, 0].errorbar(widths, m, yerr=e, fmt="o-", capsize=3, label=f"{o} (lr {lr})")
        finite = [v for v in m if math.isfinite(v)]
        spreads[o] = mean_std(finite)["std"] if len(finite) > 1 else math.nan
        rows.append([o, lr, *[f"{v * 100:.2f}" if math.isfinite(v) else "–" for v in m],
                     f"{spreads[o] * 100:.2f}", f"{(max(finite) - min(finite)) * 100:.2f}" if finite else "–"])
        best = []
        for w in widths:
            cands = [(acc[(o, name, w)]["mean"], name) for _, name in lrs[o] if acc.get((o, name, w)) and
                     math.isfinite(acc[(o, name, w)]["mean"])]
            best.append(max(cands)[1] if cands else "–")
        best_rows.append([o, *best])
    axes[0, 0].set_xlabel("Width multiplier")
    axes[0, 0].set_title("Final val accuracy vs width (reference lr)")
    legend(axes[0, 0])
    axes[0, 1].bar(list(spreads), [v * 100 for v in spreads.values()], color=["tab:blue", "tab:orange", "tab:green"][: len(spreads)])
    axes[0, 1].set_ylabel("Std of accuracy across widths (pp)")
    axes[0, 1].set_title("Transfer stability at the reference lr (lower = better)")
    for ax, o in zip((axes[1, 0], axes[1, 1]), optimizers[:2]):
        colors = plt.cm.viridis([i / max(len(widths) - 1, 1) for i in range(len(widths))])
        for w, c in zip(widths, colors):
            pts = [(v, acc.get((o, name, w))) for v, name in lrs[o]]
            pts = [(v, s) for v, s in pts if s and s["n"]]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                            yerr=[p[1]["std"] if math.isfinite(p[1]["std"]) else 0 for p in pts],
                            fmt="o-", capsize=2, color=c, label=f"width {w:g}")
        ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_title(f"{o}: accuracy vs lr per width")
        legend(ax)
    for ax in axes.flatten():
        ax.grid(True, alpha=0.3)
    name = save_figure(fig, figure_path(report_dir, study.name, "width"))
    wnames = [f"w={w:g}" for w in widths]
    t1 = md_table(["Optimizer", "lr", *wnames, "Std across widths (pp)", "Max − min (pp)"], rows)
    t2 = md_table(["Optimizer", *[f"best lr @ {n}" for n in wnames]], best_rows)
    return (f"## Width transfer\n\n![width]({name})\n\nFinal validation accuracy (%) at the reference lr:\n\n{t1}\n\n"
            f"Best learning rate per width (does it move?):\n\n{t2}"), [name]
