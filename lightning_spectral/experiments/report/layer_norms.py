"""``layer_norms``: the final spectral norm of each layer for chosen series, with their accuracy."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import figure_path, legend, pyplot, save_figure
from lightning_spectral.experiments.report.stats import fmt, label, mean_std, md_table


def section_layer_norms(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """Final per-layer spectral norms of the series matched by ``opts['select']`` (axis -> variant)."""
    plt = pyplot()
    select = {k: str(v) for k, v in (opts.get("select") or {}).items()}
    chosen = [g for g in groups.values() if all(g["axes"].get(k) == v for k, v in select.items())]
    extra = opts.get("extra") or []
    chosen += [groups[e] for e in extra if e in groups and groups[e] not in chosen]
    if not chosen:
        return "", []
    layers = list(dict.fromkeys(k for g in chosen for r in g["results"] for k in r.get("final_spectral_norms", {})))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(chosen)
    rows = []
    for i, g in enumerate(chosen):
        stats = [mean_std([r.get("final_spectral_norms", {}).get(layer, math.nan) for r in g["results"]]) for layer in layers]
        ax.bar([j + i * width for j in range(len(layers))], [s["mean"] for s in stats], width,
               yerr=[s["std"] if math.isfinite(s["std"]) else 0 for s in stats], label=label(g), capsize=2)
        s = g["stats"]
        rows.append([label(g), fmt(s.get("final_val_acc"), 100), fmt(s.get("final_train_eval_acc"), 100),
                     fmt(s.get("final_train_loss"), digits=3), fmt(s.get("mean_step_time_ms"), digits=1),
                     *[fmt(st, digits=3) for st in stats]])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, fontsize=9)
    ax.set_ylabel("σ_max (final)")
    ax.set_title("Final spectral norm per layer")
    legend(ax)
    ax.grid(True, alpha=0.3, axis="y")
    name = save_figure(fig, figure_path(report_dir, study.name, "layer_norms"))
    header = ["Series", "Test acc %", "Train acc % (eval)", "Train loss", "ms/step", *[f"σ {l}" for l in layers]]
    title = opts.get("title", "Single-lr comparison")
    return f"## {title}\n\n{md_table(header, rows)}\n\n![layer norms]({name})", [name]
