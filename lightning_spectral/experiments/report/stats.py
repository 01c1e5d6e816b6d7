"""Statistics over seeds and the Markdown tables every report section uses.

Statistics over seeds are the mean and the sample standard deviation (ddof = 1; "n = 1" rows
show the value alone). A series ("group") is one combination of the grid's variants.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lightning_spectral.diagnostics import MetricsLogger
from lightning_spectral.experiments.runner import run_dir
from lightning_spectral.experiments.spec import Run, Study, expand

STAT_KEYS = (
    "final_val_acc", "best_val_acc", "final_val_loss", "final_train_loss", "final_train_acc", "final_train_eval_acc",
    "final_max_spectral_norm", "final_sharpness", "final_grad_noise_scale", "mean_step_time_ms",
    "final_solver_inner_iterations", "final_solver_inner_residual", "final_solver_constraint",
    "final_solver_closed_form", "max_stable_lr",
    "total_time_s", "generalization_gap",
)


def derived(result: dict[str, Any]) -> dict[str, Any]:
    """A run's result with the statistics computed from others: ``generalization_gap`` =
    accuracy on the whole training set (eval mode, ``final_train_eval``) − held-out accuracy."""
    train, val = result.get("final_train_eval_acc"), result.get("final_val_acc")
    if isinstance(train, (int, float)) and isinstance(val, (int, float)):
        return {**result, "generalization_gap": train - val}
    return result


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
        g["results"].append(derived(result))
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

