"""``solvers``: time per optimizer step, inner iterations and tangency residual per solver, and
whether its steps were closed form (a formula: no iteration ran)."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_spectral.experiments.report.figures import figure_path, pyplot, save_figure, wants_log
from lightning_spectral.experiments.report.stats import fmt, fmt_g, label, md_table


def _closed_form(stat) -> str:
    """``yes`` when every step of the last epoch was a formula, ``no`` when none was."""
    if not stat or not stat["n"]:
        return "–"
    share = stat["mean"]
    return "yes" if share == 1 else "no" if share == 0 else f"{share:.0%} of steps"


def section_solvers(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = pyplot()
    gs = list(groups.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [label(g) for g in gs]
    for ax, key, title in zip(axes, ("mean_step_time_ms", "final_solver_inner_iterations", "final_solver_inner_residual"),
                              ("Time per optimizer step (ms)", "Inner iterations per step (max over layers)",
                               "Tangency residual of the step")):
        stats = [g["stats"].get(key) or {"mean": math.nan, "std": math.nan, "n": 0} for g in gs]
        if not any(s["n"] for s in stats):
            continue  # no run recorded it: the panel is dropped
        ax.bar(names, [s["mean"] if s["n"] else 0 for s in stats],
               yerr=[s["std"] if s["n"] > 1 else 0 for s in stats], capsize=2, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=9)
        if key == "final_solver_inner_iterations":  # a zero-height bar: say why
            for i, g in enumerate(gs):
                if (g["stats"].get("final_solver_closed_form") or {}).get("mean") == 1:
                    ax.annotate("closed form", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                                fontsize=9)
        means = [s["mean"] for s in stats if s["n"]]
        if wants_log(means) or (key == "final_solver_inner_residual" and any(m > 0 for m in means)):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3, axis="y")
    name = save_figure(fig, figure_path(report_dir, study.name, "solver_cost"))
    rows = [[label(g), fmt(g["stats"].get("final_val_acc"), 100), fmt(g["stats"].get("mean_step_time_ms"), digits=1),
             fmt_g(g["stats"].get("final_solver_inner_iterations")), fmt_g(g["stats"].get("final_solver_inner_residual")),
             _closed_form(g["stats"].get("final_solver_closed_form"))]
            for g in gs]
    table = md_table(["Solver", "Val acc %", "ms/step", "Inner iterations (last epoch mean)",
                      "Tangency residual (last epoch mean)", "Closed form"], rows)
    return f"## Solver cost and accuracy\n\n![solver cost]({name})\n\n{table}", [name]
