"""``collect``: aggregate a study's finished runs into tables (Markdown, JSON, CSV) and figures (PNG).

Statistics over seeds are the mean and the sample standard deviation (ddof = 1; "n = 1" rows
show the value alone). A series ("group") is one combination of the grid's variants. Sections
(``report.sections`` of the study file) add the study's own figures and tables to the summary:
``metric_grid`` (the notebook's 2×3 per-epoch grid), ``budget``, ``width``, ``lr_envelope``,
``lr_sweep`` (seed 000), ``layer_norms``, ``solvers``, ``optimizer_table`` (seed 002).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lightning_spectral.diagnostics import MetricsLogger
from lightning_spectral.experiments.recorder import write_json
from lightning_spectral.experiments.runner import run_dir
from lightning_spectral.experiments.spec import Run, Study, expand, get_dotted

DPI = 72
STAT_KEYS = (
    "final_val_acc", "best_val_acc", "final_val_loss", "final_train_loss", "final_train_acc", "final_train_eval_acc",
    "final_max_spectral_norm", "final_sharpness", "final_grad_noise_scale", "mean_step_time_ms",
    "final_solver_inner_iterations", "final_solver_inner_residual", "final_solver_constraint", "max_stable_lr",
    "total_time_s",
)
GRID_METRICS = (
    ("val_loss", "Validation loss", False), ("val_acc", "Validation accuracy", False),
    ("max_spectral_norm", "Max spectral norm", False), ("sharpness", "Sharpness (λ_max)", True),
    ("grad_noise_scale", "Gradient noise scale (B_simple)", True), ("train_loss", "Training loss", True),
)


# -- statistics -------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std (ddof = 1, NaN for one value) of the finite values; ``n`` counts them."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    n = len(vals)
    if not n:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mu = sum(vals) / n
    std = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return {"mean": mu, "std": std, "n": n}


def load_results(study: Study, out_dir: str | Path) -> list[tuple[Run, dict[str, Any]]]:
    out = []
    for run in expand(study):
        path = run_dir(study, run, out_dir) / "result.json"
        if path.exists():
            out.append((run, json.loads(path.read_text())))
    return out


def group_results(results: list[tuple[Run, dict[str, Any]]]) -> "OrderedDict[str, dict[str, Any]]":
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for run, result in results:
        g = groups.setdefault(run.group, {"group": run.group, "axes": run.axes, "values": run.values, "results": []})
        g["results"].append(result)
    for g in groups.values():
        rs = g["results"]
        g["n"] = len(rs)
        g["seeds"] = [r["seed"] for r in rs]
        g["diverged"] = sum(r.get("status") == "diverged" for r in rs)
        g["stats"] = {k: mean_std([r.get(k, math.nan) for r in rs]) for k in STAT_KEYS if any(k in r for r in rs)}
        histories = [MetricsLogger(r["history"]) for r in rs if r.get("history")]
        g["curves"] = MetricsLogger.aggregate_seeds(histories) if histories else {"mean": [], "std": []}
    return groups


def fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stat or stat["n"] == 0:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def fmt_g(stat: dict[str, float] | None) -> str:
    if not stat or stat["n"] == 0:
        return "–"
    return f"{stat['mean']:.3g}" + (f" ± {stat['std']:.2g}" if stat["n"] > 1 else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def label(group: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    axes = {k: v for k, v in group["axes"].items() if k not in drop}
    if len(axes) == 1:
        return next(iter(axes.values()))
    return ", ".join(f"{k}={v}" for k, v in axes.items()) or "all"


# -- figures ----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(group: dict[str, Any], key: str) -> tuple[list[float], list[float], list[float]]:
    xs, ms, ss = [], [], []
    for mean, std in zip(group["curves"]["mean"], group["curves"]["std"]):
        if key in mean and "epoch" in mean:
            xs.append(mean["epoch"])
            ms.append(mean[key])
            ss.append(std.get(key, math.nan))
    return xs, ms, ss


def _plot_band(ax, xs, ms, ss, **kwargs) -> None:
    line = ax.plot(xs, ms, **kwargs)[0]
    lo = [m - s for m, s in zip(ms, ss) if math.isfinite(s)]
    if len(lo) == len(ms) and ms:
        ax.fill_between(xs, lo, [m + s for m, s in zip(ms, ss)], color=line.get_color(), alpha=0.2)


def metric_grid(groups, path: Path, title: str, select=None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    chosen = [g for g in groups.values() if select is None or select(g)]
    for ax, (key, name, log) in zip(axes.flatten(), GRID_METRICS):
        for g in chosen:
            xs, ms, ss = _curve(g, key)
            if xs:
                _plot_band(ax, xs, ms, ss, label=label(g), linewidth=1.6)
        ax.set_xlabel("Epoch")
        ax.set_title(name, fontsize=10)
        if log and all(v > 0 for g in chosen for v in _curve(g, key)[1] if math.isfinite(v)) and any(
                _curve(g, key)[0] for g in chosen):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=64)
    plt.close(fig)


# -- sections ---------------------------------------------------------------------------------
def summary_section(groups, opts: dict[str, Any]) -> str:
    extra = opts.get("columns", [])
    header = ["Series", "Seeds", "Val acc % (final)", "Val acc % (best)", "Val loss", "Train loss",
              "Max σ (final)", "Sharpness", "GNS", "ms/step", *[c["title"] for c in extra]]
    rows = []
    for g in groups.values():
        s = g["stats"]
        n = f"{g['n']}" + (f" ({g['diverged']} diverged)" if g["diverged"] else "")
        row = [label(g), n, fmt(s.get("final_val_acc"), 100), fmt(s.get("best_val_acc"), 100),
               fmt(s.get("final_val_loss"), digits=3), fmt(s.get("final_train_loss"), digits=3),
               fmt(s.get("final_max_spectral_norm"), digits=3), fmt_g(s.get("final_sharpness")),
               fmt_g(s.get("final_grad_noise_scale")), fmt(s.get("mean_step_time_ms"), digits=1)]
        row += [fmt_g(s.get(c["key"])) for c in extra]
        rows.append(row)
    return "## Summary (mean ± std over seeds, final epoch)\n\n" + md_table(header, rows)


def section_metric_grid(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    name = f"{study.name}_metrics.png"
    metric_grid(groups, report_dir / name, opts.get("title", f"{study.name}: per-epoch metrics (mean ± std)"))
    return (f"## Per-epoch metrics\n\nThe notebook's 2×3 grid; lines are the mean over seeds, bands ± one std.\n\n"
            f"![metrics]({name})"), [name]


def section_budget(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = _plt()
    axis = opts.get("axis", "budget")
    gs = sorted(groups.values(), key=lambda g: float(g["values"][axis]))
    colors = plt.cm.viridis([i / max(len(gs) - 1, 1) for i in range(len(gs))])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for g, c in zip(gs, colors):
        for ax, key in zip(axes[:2], ("val_acc", "max_spectral_norm")):
            xs, ms, ss = _curve(g, key)
            _plot_band(ax, xs, ms, ss, color=c, label=f"η={g['axes'][axis]}", linewidth=1.6)
    axes[0].set_title("Validation accuracy vs spectral budget")
    axes[1].set_title("Max spectral norm trajectory")
    for ax in axes[:2]:
        ax.set_xlabel("Epoch")
        ax.legend(fontsize=7)
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
            axes[2].legend(fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("Spectral budget η")
    axes[2].set_title("Final validation accuracy vs budget")
    axes[2].grid(True, alpha=0.3)
    fig.tight_layout()
    name = f"{study.name}_budget.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
    rows = [[g["axes"][axis], fmt(g["stats"].get("final_val_acc"), 100), fmt(g["stats"].get("final_train_loss"), digits=3),
             fmt(g["stats"].get("final_max_spectral_norm"), digits=3)] for g in gs]
    table = md_table(["Budget η", "Val acc %", "Train loss", "Max σ (final)"], rows)
    return f"## Budget sweep\n\n![budget]({name})\n\n{table}", [name]


def section_width(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = _plt()
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
    axes[0, 0].legend(fontsize=8)
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
        ax.legend(fontsize=7)
    for ax in axes.flatten():
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    name = f"{study.name}_width.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
    wnames = [f"w={w:g}" for w in widths]
    t1 = md_table(["Optimizer", "lr", *wnames, "Std across widths (pp)", "Max − min (pp)"], rows)
    t2 = md_table(["Optimizer", *[f"best lr @ {n}" for n in wnames]], best_rows)
    return (f"## Width transfer\n\n![width]({name})\n\nFinal validation accuracy (%) at the reference lr:\n\n{t1}\n\n"
            f"Best learning rate per width (does it move?):\n\n{t2}"), [name]


def section_lr_envelope(study, results, report_dir: Path, opts) -> tuple[str, list[str]]:
    if not results:
        return "## Stability envelope\n\nNo finished runs yet.", []
    plt = _plt()
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
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    name = f"{study.name}_envelope.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
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


def section_lr_sweep(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = _plt()
    lr_axis, m_axis = opts.get("lr_axis", "lr"), opts.get("method_axis", "method")
    methods = list(dict.fromkeys(g["axes"][m_axis] for g in groups.values()))
    fig, ax = plt.subplots(figsize=(8, 5))
    table: dict[str, dict[str, str]] = {}
    lrs_all = sorted({float(g["values"][lr_axis]) for g in groups.values()})
    for method in methods:
        gs = sorted([g for g in groups.values() if g["axes"][m_axis] == method], key=lambda g: float(g["values"][lr_axis]))
        xs = [float(g["values"][lr_axis]) for g in gs]
        for key, style in (("final_val_acc", "o-"), ("final_train_eval_acc", "s--")):
            stats = [g["stats"].get(key) for g in gs]
            if not any(stats):
                continue
            line = ax.errorbar(xs, [s["mean"] * 100 if s else math.nan for s in stats],
                               yerr=[s["std"] * 100 if s and math.isfinite(s["std"]) else 0 for s in stats],
                               fmt=style, capsize=2, label=f"{method} ({'test' if key == 'final_val_acc' else 'train'})",
                               alpha=1.0 if key == "final_val_acc" else 0.6)
        best = max(gs, key=lambda g: g["stats"]["final_val_acc"]["mean"] if g["stats"].get("final_val_acc", {}).get("n") else -1)
        if best["stats"].get("final_val_acc", {}).get("n"):
            ax.annotate(f"{best['stats']['final_val_acc']['mean'] * 100:.1f}%",
                        (float(best["values"][lr_axis]), best["stats"]["final_val_acc"]["mean"] * 100),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        for g in gs:
            s = g["stats"]
            table.setdefault(g["axes"][lr_axis], {})[method] = (
                f"{fmt(s.get('final_val_acc'), 100)} ({fmt(s.get('final_train_eval_acc'), 100)})")
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate")
    ax.set_ylabel("Accuracy %")
    ax.set_title("Learning-rate sweep: test (solid) and train (dashed) accuracy")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    name = f"{study.name}_lr_sweep.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
    names = {f"{v:g}" for v in lrs_all}
    rows = [[lr, *[table.get(lr, {}).get(m, "–") for m in methods]] for lr in sorted(table, key=float) if lr in names or True]
    return (f"## Learning-rate sweep\n\n![lr sweep]({name})\n\nHeld-out accuracy % (training-set accuracy % in eval "
            f"mode), mean ± std over seeds:\n\n{md_table(['lr', *methods], rows)}"), [name]


def section_layer_norms(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """Final per-layer spectral norms of the series matched by ``opts['select']`` (axis -> variant)."""
    plt = _plt()
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
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, fontsize=8)
    ax.set_ylabel("σ_max (final)")
    ax.set_title("Final spectral norm per layer")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3, axis="y")
    fig.tight_layout()
    name = f"{study.name}_layer_norms.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
    header = ["Series", "Test acc %", "Train acc % (eval)", "Train loss", "ms/step", *[f"σ {l}" for l in layers]]
    title = opts.get("title", "Single-lr comparison")
    return f"## {title}\n\n{md_table(header, rows)}\n\n![layer norms]({name})", [name]


def section_solvers(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    plt = _plt()
    gs = list(groups.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [label(g) for g in gs]
    for ax, key, title in zip(axes, ("mean_step_time_ms", "final_solver_inner_iterations", "final_solver_inner_residual"),
                              ("Time per optimizer step (ms)", "Inner iterations per step (max over layers)",
                               "Tangency residual of the step")):
        stats = [g["stats"].get(key) or {"mean": math.nan, "std": math.nan, "n": 0} for g in gs]
        ax.bar(names, [s["mean"] if s["n"] else 0 for s in stats],
               yerr=[s["std"] if s["n"] > 1 else 0 for s in stats], capsize=2, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        if key == "final_solver_inner_residual" and any(s["n"] and s["mean"] > 0 for s in stats):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3, axis="y")
    fig.tight_layout()
    name = f"{study.name}_solver_cost.png"
    fig.savefig(report_dir / name, dpi=DPI)
    plt.close(fig)
    rows = [[label(g), fmt(g["stats"].get("final_val_acc"), 100), fmt(g["stats"].get("mean_step_time_ms"), digits=1),
             fmt_g(g["stats"].get("final_solver_inner_iterations")), fmt_g(g["stats"].get("final_solver_inner_residual"))]
            for g in gs]
    table = md_table(["Solver", "Val acc %", "ms/step", "Inner iterations (last epoch mean)",
                      "Tangency residual (last epoch mean)"], rows)
    return f"## Solver cost and accuracy\n\n![solver cost]({name})\n\n{table}", [name]


def section_optimizer_table(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """Seed 002's table: ``Optimizer | Loss | Accuracy | Notes``, sorted by accuracy (best first)."""
    notes = opts.get("notes") or {}
    gs = sorted(groups.values(), key=lambda g: -(g["stats"].get("final_val_acc", {}).get("mean", -1)
                                                   if math.isfinite(g["stats"].get("final_val_acc", {}).get("mean", math.nan)) else -1))
    best_acc = max((g for g in gs), key=lambda g: g["stats"].get("final_val_acc", {}).get("mean", -1), default=None)
    best_loss = min((g for g in gs if g["stats"].get("final_train_loss", {}).get("n")),
                    key=lambda g: g["stats"]["final_train_loss"]["mean"], default=None)
    rows, table_json = [], []
    for g in gs:
        s = g["stats"]
        name, loss, acc = label(g), fmt_g(s.get("final_train_loss")), fmt(s.get("final_val_acc"), 100) + "%"
        if g is best_acc:
            acc = f"**{acc}**"
        if g is best_loss:
            loss = f"**{loss}**"
        note = notes.get(name, "")
        if g["diverged"]:
            note = (note + "; " if note else "") + f"{g['diverged']}/{g['n']} runs diverged"
        rows.append([f"**{name}**" if g is best_acc else name, loss, acc, note])
        table_json.append({"optimizer": name, "loss": s.get("final_train_loss"), "accuracy": s.get("final_val_acc"),
                           "notes": note, "seeds": g["seeds"]})
    write_json(report_dir / "table.json", table_json)
    (report_dir / "table.md").write_text(md_table(["Optimizer", "Loss", "Accuracy", "Notes"], rows) + "\n")
    return ("## Optimizer comparison (seed 002's table)\n\nLoss: mean training loss of the last epoch; accuracy: "
            "held-out accuracy after the last epoch; mean ± std over seeds.\n\n"
            + md_table(["Optimizer", "Loss", "Accuracy", "Notes"], rows)), []


SECTIONS = {
    "metric_grid": section_metric_grid, "budget": section_budget, "width": section_width,
    "lr_sweep": section_lr_sweep, "layer_norms": section_layer_norms, "solvers": section_solvers,
    "optimizer_table": section_optimizer_table,
}


def _setup_line(study: Study) -> str:
    base = study.base
    if study.kind == "lr_scan":
        scan = study.scan
        return (f"lr_stability_scan: {scan.get('num_lrs', 10)} lrs in {tuple(scan.get('lr_range', (1e-3, 2.0)))}, "
                f"{scan.get('steps_per_lr', 50)} steps each; data `{get_dotted(base, 'data.class_path', '?')}`; "
                f"model `{get_dotted(base, 'model.init_args.net.class_path', '?')}`")
    epochs = get_dotted(base, "trainer.max_epochs")
    steps = get_dotted(base, "trainer.max_steps")
    return (f"data `{get_dotted(base, 'data.class_path', '?').split('.')[-1]}` "
            f"(batch {get_dotted(base, 'data.init_args.batch_size', '?')}), "
            f"model `{get_dotted(base, 'model.init_args.net.class_path', '?').split('.')[-1]}` "
            f"{get_dotted(base, 'model.init_args.net.init_args', {}) or ''}, "
            f"{f'{epochs} epochs' if epochs else f'{steps} steps'} (cosine schedule per step unless stated), "
            f"seeds {study.seeds}")


def collect(study: Study, out_dir: str | Path, report_dir: str | Path | None = None,
            command: str | None = None, docs_dir: str | Path | None = None) -> Path:
    """Aggregate the finished runs into ``report_dir`` (default ``<out_dir>/<study>/report``):
    ``summary.md``, ``results.json`` (every run incl. history, and per-series statistics and
    per-epoch mean/std curves), ``runs.csv``, ``summary.csv`` and the figures. With ``docs_dir``
    also writes ``<docs_dir>/<study>.md`` and its PNGs under ``<docs_dir>/figures/``."""
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir else out_dir / study.name / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(study, out_dir)
    total = len(expand(study))
    groups = group_results(results)
    parts = [f"# {study.report.get('title', study.name)}", study.description.strip(),
             f"**Command:** `{command or f'python -m lightning_spectral study --config configs/studies/{study.name}.yaml'}`",
             f"**Setup:** {_setup_line(study)}.",
             f"**Runs:** {len(results)} of {total} finished"
             + (f", {sum(g['diverged'] for g in groups.values())} diverged" if any(g['diverged'] for g in groups.values()) else "")
             + ". Raw results: `results.json`, `runs.csv`, `summary.csv` and each run's TensorBoard log under "
               f"`{out_dir / study.name}/runs/`."]
    figures: list[str] = []
    if study.kind == "lr_scan":
        text, figs = section_lr_envelope(study, results, report_dir, study.report)
        parts.append(text)
        figures += figs
    else:
        for section in study.report.get("sections", ["metric_grid"]):
            kind, opts = (section, {}) if isinstance(section, str) else (section["type"], section)
            text, figs = SECTIONS[kind](study, groups, report_dir, opts)
            if text:
                parts.append(text)
            figures += figs
        parts.append(summary_section(groups, study.report.get("summary", {})))
    if study.report.get("notes"):
        parts.append("## Notes\n\n" + study.report["notes"].strip())
    markdown = "\n\n".join(p for p in parts if p) + "\n"
    (report_dir / "summary.md").write_text(markdown)
    flat = []
    for run, r in results:
        flat.append({k: v for k, v in r.items() if k not in ("history", "axes", "values") and not isinstance(v, (dict, list))}
                    | {f"axis_{k}": v for k, v in run.axes.items()})
    write_json(report_dir / "results.json", {
        "study": study.name, "description": study.description, "runs": [r for _, r in results],
        "groups": [{k: v for k, v in g.items() if k != "results"} for g in groups.values()],
    })
    _write_csv(report_dir / "runs.csv", flat)
    _write_csv(report_dir / "summary.csv", [
        {"series": g["group"], "n": g["n"], "diverged": g["diverged"],
         **{f"{k}_{s}": v[s] for k, v in g["stats"].items() for s in ("mean", "std")}} for g in groups.values()])
    if docs_dir is not None:
        docs = Path(docs_dir)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        for fig in figures:
            shutil.copyfile(report_dir / fig, docs / "figures" / fig)
            markdown = markdown.replace(f"]({fig})", f"](figures/{fig})")
        (docs / f"{study.name}.md").write_text(markdown)
    return report_dir


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
