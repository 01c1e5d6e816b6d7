"""``lm``: the language-model comparison of optimizers, each at its best learning rate.

Per optimizer (the ``method_axis``, default ``optimizer``) the study sweeps learning rates (the
``lr_axis``, default ``lr``) with one seed and repeats one of them with more seeds. The chosen
series of an optimizer is its learning rate with the most seeds (ties: the lower final validation
loss of the sweep seed). For it, over seeds (mean ± sample std):

- final validation loss (nats per byte) and bits per byte ``loss / ln 2``: equal steps, since
  every run takes the same number of optimizer steps;
- steps and seconds to reach ``target_loss`` (required option): the first crossing, linearly
  interpolated between the last evaluation above the target and the first at or below it;
- validation loss at equal wall time ``T*``, the shortest total time of the chosen runs that did
  not diverge, linearly interpolated in each run's (seconds, loss) history;
- the optimizer's share of the time: ``Σ step_time · Δsteps / total seconds``.

Then the winners at equal steps (final loss) and at equal time (loss at ``T*``), each with its
runner-up, the gap and the gap in standard errors (Welch: ``Δ / √(s₁²/n₁ + s₂²/n₂)``), and what
would change the conclusion, read from the runs: a gap within two standard errors (more seeds
decide it), a best learning rate at the edge of its sweep (the optimum may lie beyond), seeds
run at a setting other than the sweep's best, a runner-up whose loss falls faster over the last
quarter of the run (the steps it would need to catch up at those rates), and the budget: the
equal-time ranking holds for this machine's per-step costs (the optimizer's share of the time).
Settings swept beside the learning rate (AdamW's β₂, the warm-up) label the sweep's entries.

Seconds are the cumulative ``time`` of the history rows: the wall time of each training epoch
from its start to its end, which holds the training steps, data loading, and the validation pass
(the same for every optimizer) and checkpoint that end the epoch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_spectral.experiments.files import write_json
from lightning_spectral.experiments.report.figures import figure_path, legend, plot_band, pyplot, save_figure
from lightning_spectral.experiments.report.stats import fmt, md_table, mean_std

LN2 = math.log(2.0)


def trajectory(history: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """``(steps, cumulative seconds, validation loss)`` at each history row (rows without a
    finite validation loss are dropped, their time still counted)."""
    steps, seconds, losses, total = [], [], [], 0.0
    for row in history:
        total += float(row.get("time", 0.0))
        loss = row.get("val_loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            steps.append(float(row["step"]))
            seconds.append(total)
            losses.append(float(loss))
    return steps, seconds, losses


def first_crossing(xs: list[float], ys: list[float], target: float) -> tuple[float, bool]:
    """The ``x`` at which ``y`` first reaches ``target`` (``y <= target``), linearly interpolated
    between the point before and the first point at or below it, and whether it is exact; NaN
    when never. When the first point is already at or below the target there is nothing to
    interpolate from: its ``x`` is returned, flagged inexact (an upper bound)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return x, False
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y), True
    return math.nan, True


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """``y`` at ``x`` by linear interpolation between the neighbouring points (``xs``
    increasing); NaN outside ``[xs[0], xs[-1]]``."""
    if not xs:
        return math.nan
    return float(np.interp(x, xs, ys, left=math.nan, right=math.nan))


def optimizer_fraction(history: list[dict[str, Any]]) -> float:
    """The share of the run's wall time spent in ``optimizer.step``: ``Σ step_time_ms/1000 ·
    (steps taken in the row) / Σ time``; NaN when no row timed a step."""
    previous, spent, total, timed = 0, 0.0, 0.0, False
    for row in history:
        total += float(row.get("time", 0.0))
        if isinstance(row.get("step_time_ms"), (int, float)) and math.isfinite(row["step_time_ms"]):
            spent += row["step_time_ms"] / 1000.0 * (row["step"] - previous)
            timed = True
        previous = row["step"]
    return spent / total if timed and total > 0 else math.nan


def _final_loss(result: dict[str, Any]) -> float:
    _, _, losses = trajectory(result.get("history") or [])
    return losses[-1] if losses and result.get("status") != "diverged" else math.nan


def _sweep_result(group: dict[str, Any]) -> dict[str, Any]:
    """The run of the learning-rate sweep: the group's lowest seed."""
    return min(group["results"], key=lambda r: r["seed"])


def choose(groups_of_method: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen series: the most seeds; among those, the lowest final loss of the sweep seed."""
    def key(g):
        loss = _final_loss(_sweep_result(g))
        return (-g["n"], loss if math.isfinite(loss) else math.inf)
    return min(groups_of_method, key=key)


def _reach(values: list[tuple[float, bool]], n: int, digits: int) -> str:
    """Mean ± std of the runs that reached the target, with how many did when not all."""
    reached = [v for v, _ in values if math.isfinite(v)]
    if not reached:
        return "not reached"
    text = ("≤ " if not all(exact for v, exact in values if math.isfinite(v)) else "") + fmt(mean_std(reached),
                                                                                          digits=digits)
    return text if len(reached) == n else f"{text} ({len(reached)}/{n} reached)"


def _lr_text(value: Any) -> str:
    return f"{float(value):g}" if isinstance(value, (int, float)) else str(value)


def _curves(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean over seeds of steps and seconds, mean and std of the loss, at each evaluation all
    the seeds have."""
    trajs = [trajectory(r.get("history") or []) for r in results]
    n = min((len(t[0]) for t in trajs), default=0)
    out: dict[str, list[float]] = {"step": [], "seconds": [], "mean": [], "std": []}
    for i in range(n):
        stat = mean_std([t[2][i] for t in trajs])
        out["step"].append(sum(t[0][i] for t in trajs) / len(trajs))
        out["seconds"].append(sum(t[1][i] for t in trajs) / len(trajs))
        out["mean"].append(stat["mean"])
        out["std"].append(stat["std"])
    return out


def _others(group: dict[str, Any], m_axis: str, lr_axis: str) -> str:
    """The series' settings besides the optimizer and the learning rate (``beta2 0.99, warmup 300``)."""
    return ", ".join(f"{k} {v}" for k, v in group["axes"].items() if k not in (m_axis, lr_axis))


def standard_errors(lead: dict[str, float], other: dict[str, float]) -> float:
    """``(mean_other − mean_lead) / √(s_lead²/n_lead + s_other²/n_other)``: the gap in standard errors of
    the difference of the means (Welch); NaN unless both have two or more values."""
    if lead["n"] < 2 or other["n"] < 2:
        return math.nan
    se = math.sqrt(lead["std"] ** 2 / lead["n"] + other["std"] ** 2 / other["n"])
    gap = other["mean"] - lead["mean"]
    return gap / se if se > 0 else (math.inf if gap > 0 else math.nan)


def winner(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The row with the lowest mean ``key`` and the runner-up, the gap and the gap in standard errors."""
    ranked = sorted((r for r in rows if math.isfinite(r[key]["mean"])), key=lambda r: r[key]["mean"])
    if not ranked:
        return None
    out = {"optimizer": ranked[0]["optimizer"], "stat": ranked[0][key], "runner_up": None, "gap": math.nan,
           "standard_errors": math.nan}
    if len(ranked) > 1:
        out.update(runner_up=ranked[1]["optimizer"], runner_up_stat=ranked[1][key],
                   gap=ranked[1][key]["mean"] - ranked[0][key]["mean"],
                   standard_errors=standard_errors(ranked[0][key], ranked[1][key]))
    return out


def _tail_slope(curve: dict[str, list[float]]) -> float:
    """The least-squares slope (loss per step) of the seeds' mean loss over the last quarter of the
    evaluations (at least the last two); NaN with fewer than two."""
    n = len(curve["step"])
    k = max(2, n // 4)
    if n < 2:
        return math.nan
    return float(np.polyfit(curve["step"][-k:], curve["mean"][-k:], 1)[0])


def _stat_text(stat: dict[str, float]) -> str:
    return fmt(stat, digits=3) + f" (n = {stat['n']})"


def _lead_sentence(what: str, win: dict[str, Any]) -> str:
    text = f"**{what}: {win['optimizer']}**, {_stat_text(win['stat'])}"
    if win["runner_up"] is None:
        return text + ", the only optimizer with a finite loss."
    z = win["standard_errors"]
    zt = f"{z:.1f} standard errors" if math.isfinite(z) else "no standard error: fewer than two seeds"
    return (text + f", ahead of {win['runner_up']}, {_stat_text(win['runner_up_stat'])}, by {win['gap']:.3f} "
            f"nats ({zt}).")


def conclusion_changes(rows, chosen, by_method, wins, curves, m_axis, lr_axis) -> list[str]:
    """What would change the conclusion, read from the runs (see the module docstring)."""
    out: list[str] = []
    for what, win in (("equal steps", wins["equal_steps"]), ("equal time", wins["equal_time"])):
        if win is None or win["runner_up"] is None:
            continue
        z = win["standard_errors"]
        if not math.isfinite(z) or z < 2:
            out.append(f"Seeds ({what}): {win['optimizer']}'s lead over {win['runner_up']} is "
                       + (f"{z:.1f} standard errors, within seed noise: more seeds would decide it."
                          if math.isfinite(z) else "not measured against seed noise (fewer than two seeds)."))
    for method, groups_of_method in by_method.items():
        sweep = [g for g in groups_of_method if isinstance(g["values"].get(lr_axis), (int, float))]
        losses = {id(g): _final_loss(_sweep_result(g)) for g in sweep}
        finite = [g for g in sweep if math.isfinite(losses[id(g)])]
        if not finite:
            continue
        best = min(finite, key=lambda g: losses[id(g)])
        same = [float(g["values"][lr_axis]) for g in sweep
                if _others(g, m_axis, lr_axis) == _others(best, m_axis, lr_axis)]
        lr = float(best["values"][lr_axis])
        if len(set(same)) > 1 and lr in (min(same), max(same)):
            edge = "smallest" if lr == min(same) else "largest"
            out.append(f"Sweep ({method}): its best learning rate {lr:g} is the {edge} swept, so its optimum may "
                       f"lie beyond it, with a lower loss.")
        if best is not chosen[method]:
            out.append(f"Sweep ({method}): its seeds ran at {_setting(chosen[method], m_axis, lr_axis)}, but the "
                       f"sweep's best is {_setting(best, m_axis, lr_axis)}.")
    win = wins["equal_steps"]
    if win is not None and win["runner_up"] is not None:
        lead, other = _tail_slope(curves[win["optimizer"]]), _tail_slope(curves[win["runner_up"]])
        steps = curves[win["optimizer"]]["step"]
        if math.isfinite(lead) and math.isfinite(other) and other < lead:
            catch = win["gap"] / (lead - other)
            out.append(f"Horizon: over the last quarter of the run {win['runner_up']}'s loss falls faster than "
                       f"{win['optimizer']}'s ({other * 1000:.3f} against {lead * 1000:.3f} nats per 1000 steps): "
                       f"at those rates it would catch up after about {catch:.0f} more steps (the run is "
                       f"{steps[-1]:.0f}); a longer horizon, with its schedule, could reverse the order.")
        elif math.isfinite(lead) and math.isfinite(other):
            out.append(f"Horizon: over the last quarter of the run {win['runner_up']}'s loss falls no faster than "
                       f"{win['optimizer']}'s ({other * 1000:.3f} against {lead * 1000:.3f} nats per 1000 steps), "
                       f"so these rates would not close the gap; a longer run with its own schedule is not measured.")
    steps_win, time_win = wins["equal_steps"], wins["equal_time"]
    if steps_win is not None and time_win is not None:
        shares = ", ".join(f"{r['optimizer']} {100 * r['optimizer_time_fraction']['mean']:.0f} %" for r in rows
                           if math.isfinite(r["optimizer_time_fraction"]["mean"]))
        same = "the same optimizer wins both" if steps_win["optimizer"] == time_win["optimizer"] else (
            f"the winners differ ({steps_win['optimizer']} at equal steps, {time_win['optimizer']} at equal time): "
            "the answer depends on the budget")
        out.append(f"Budget: {same}. The equal-time ranking holds for this machine's cost of a step; where the "
                   f"optimizer's share of the time differs (another device, a fused or distributed step) it moves"
                   + (f" (here: {shares})." if shares else "."))
    return out


def _setting(group: dict[str, Any], m_axis: str, lr_axis: str) -> str:
    lr = group["values"].get(lr_axis)
    other = _others(group, m_axis, lr_axis)
    return f"lr {_lr_text(lr)}" + (f" ({other})" if other else "")


def section_lm(study, groups, report_dir: Path, opts) -> tuple[str, list[str]]:
    """The comparison table, the learning-rate sweep and two figures (validation loss against
    steps and against seconds; final loss against the learning rate); also ``lm_table.json``."""
    if not isinstance(opts.get("target_loss"), (int, float)):
        raise ValueError("report section 'lm' needs target_loss: the validation loss (nats per byte) whose "
                         "steps and seconds to reach it are reported, e.g. {type: lm, target_loss: 1.6}")
    target = float(opts["target_loss"])
    m_axis, lr_axis = opts.get("method_axis", "optimizer"), opts.get("lr_axis", "lr")
    by_method: dict[str, list[dict[str, Any]]] = {}
    for g in groups.values():
        if m_axis not in g["axes"]:
            raise ValueError(f"report section 'lm': the series {g['group']!r} has no axis {m_axis!r}; name the "
                             f"optimizer axis with method_axis (the axes are {', '.join(g['axes'])})")
        by_method.setdefault(g["axes"][m_axis], []).append(g)
    chosen = {m: choose(gs) for m, gs in by_method.items()}
    times = [trajectory(r.get("history") or [])[1] for g in chosen.values() for r in g["results"]
             if r.get("status") != "diverged"]  # a run stopped by divergence would set T* to its early end
    t_equal = min((t[-1] for t in times if t), default=math.nan)

    rows, table, sweep_rows = [], [], []
    for method, g in chosen.items():
        rs, n = g["results"], g["n"]
        trajs = [trajectory(r.get("history") or []) for r in rs]
        finals = [_final_loss(r) for r in rs]
        steps_to = [first_crossing(t[0], t[2], target) for t in trajs]
        secs_to = [first_crossing(t[1], t[2], target) for t in trajs]
        at_equal = [value_at(t[1], t[2], t_equal) for t in trajs]
        fraction = [optimizer_fraction(r.get("history") or []) for r in rs]
        total = [t[1][-1] if t[1] else math.nan for t in trajs]
        lr = g["values"].get(lr_axis)
        diverged = f" ({g['diverged']} diverged)" if g["diverged"] else ""
        other = _others(g, m_axis, lr_axis)
        rows.append([method, (_lr_text(lr) if lr is not None else "–") + (f" ({other})" if other else ""),
                     f"{n}{diverged}",
                     fmt(mean_std(finals), digits=3), fmt(mean_std([f / LN2 for f in finals]), digits=3),
                     _reach(steps_to, n, 0), _reach(secs_to, n, 1), fmt(mean_std(at_equal), digits=3),
                     fmt(mean_std(fraction), 100, 1), fmt(mean_std(total), digits=1)])
        table.append({"optimizer": method, "lr": lr, "settings": other, "seeds": g["seeds"], "diverged": g["diverged"],
                      "final_val_loss": mean_std(finals), "final_val_bpb": mean_std([f / LN2 for f in finals]),
                      "steps_to_target": [v for v, _ in steps_to], "seconds_to_target": [v for v, _ in secs_to],
                      "val_loss_at_equal_time": mean_std(at_equal), "optimizer_time_fraction": mean_std(fraction),
                      "total_seconds": mean_std(total)})
        sweep = sorted(by_method[method], key=lambda s: (_others(s, m_axis, lr_axis),
                                                         float(s["values"].get(lr_axis, 0.0))))
        losses = {id(s): _final_loss(_sweep_result(s)) for s in sweep}
        finite = [s for s in sweep if math.isfinite(losses[id(s)])]
        best = min(finite, key=lambda s: losses[id(s)]) if finite else None
        cells = []
        for s in sweep:
            other = _others(s, m_axis, lr_axis)
            text = f"{_lr_text(s['values'].get(lr_axis, '–'))}{f' ({other})' if other else ''}: " + (
                f"{losses[id(s)]:.3f}" if math.isfinite(
                losses[id(s)]) else "diverged" if s["diverged"] else "–")
            cells.append(f"**{text}**" if s is best else text)
        note = "" if best is None or best is g else "the sweep's best is not the setting with the most seeds"
        sweep_rows.append([method, " · ".join(cells), note])
    curves = {method: _curves(g["results"]) for method, g in chosen.items()}
    wins = {"equal_steps": winner(table, "final_val_loss"), "equal_time": winner(table, "val_loss_at_equal_time")}
    changes = conclusion_changes(table, chosen, by_method, wins, curves, m_axis, lr_axis)
    write_json(report_dir / "lm_table.json", {"target_loss": target, "equal_time_s": t_equal, "rows": table,
                                              "winners": wins, "what_would_change_it": changes})

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tops = []
    for method, c in curves.items():
        for ax, key in zip(axes, ("step", "seconds")):
            plot_band(ax, c[key], c["mean"], c["std"], label=method, linewidth=1.6)
        tops += c["mean"][len(c["mean"]) // 4:]
    for ax, xlabel in zip(axes, ("Optimizer step", "Seconds (cumulative epoch wall time)")):
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        finite_tops = [t for t in tops if math.isfinite(t)]
        if finite_tops:
            ax.set_ylim(top=max(finite_tops) + 0.1)  # the first evaluations (loss near ln 256) would flatten the rest
    if math.isfinite(t_equal):
        axes[1].axvline(t_equal, color="black", ls=":", lw=1, label=f"equal time {t_equal:.0f} s")
    axes[0].set_title("Validation loss vs steps (mean ± std over seeds)", fontsize=10)
    axes[1].set_title("Validation loss vs wall time", fontsize=10)
    legend(axes[0])
    legend(axes[1])
    curves_name = save_figure(fig, figure_path(report_dir, study.name, "val_loss"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, gs in by_method.items():
        for other in dict.fromkeys(_others(s, m_axis, lr_axis) for s in gs):
            sweep = sorted((s for s in gs if _others(s, m_axis, lr_axis) == other and lr_axis in s["values"]),
                           key=lambda s: float(s["values"][lr_axis]))
            if sweep:
                ax.plot([float(s["values"][lr_axis]) for s in sweep], [_final_loss(_sweep_result(s)) for s in sweep],
                        "o-", label=f"{method} ({other})" if other else method)
    ax.set_xscale("log")
    ax.set_xlabel("Learning rate (of the matrix rule; AdamW: of every parameter)")
    ax.set_ylabel("Final validation loss")
    ax.set_title("Learning-rate sweep (sweep seed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend(ax)
    sweep_name = save_figure(fig, figure_path(report_dir, study.name, "lr_sweep_loss"))

    header = ["Optimizer", "lr", "Seeds", "Val loss (final)", "Val bpb (final)", f"Steps to {target:g}",
              f"Seconds to {target:g}", f"Val loss at {t_equal:.0f} s", "Optimizer % of time", "Seconds (total)"]
    text = (f"## Language model: optimizers at their best learning rate\n\n"
            f"Mean ± std over seeds. Equal steps: the final validation loss (nats per byte; bits per byte = loss / "
            f"ln 2), every run taking the same steps. Steps and seconds to reach the target loss {target:g} "
            f"({target / LN2:.3f} bpb): the first crossing, interpolated linearly between evaluations (≤: reached "
            f"by the first evaluation). Equal wall time: the validation loss after {t_equal:.1f} s, the shortest "
            f"total time of these runs, interpolated. Seconds are the cumulative wall time of the training epochs "
            f"(training steps, data loading, and the validation pass, the same for every optimizer, and checkpoint "
            f"that end each epoch), measured on the machine the study ran on; the optimizer's share is the "
            f"time inside `optimizer.step()` over those seconds.\n\n{md_table(header, rows)}\n\n"
            f"![validation loss]({curves_name})\n\n"
            f"### Winners\n\n{_winners_text(wins, t_equal, changes)}\n\n"
            f"### Learning-rate sweep\n\nFinal validation loss of the sweep seed at each learning rate (bold: the "
            f"lowest; other settings swept beside it in brackets); the table above uses each optimizer's "
            f"setting with the most seeds.\n\n"
            f"{md_table(['Optimizer', 'lr: final val loss', 'Note'], sweep_rows)}\n\n![lr sweep]({sweep_name})")
    return text, [curves_name, sweep_name]


def _winners_text(wins: dict[str, Any], t_equal: float, changes: list[str]) -> str:
    """The winners' sentences and the list of what would change the conclusion."""
    lines = []
    for what, key in ((f"Equal steps (final validation loss)", "equal_steps"),
                      (f"Equal time (validation loss at {t_equal:.0f} s)", "equal_time")):
        lines.append(_lead_sentence(what, wins[key]) if wins[key] is not None else f"**{what}**: no finite loss.")
    text = "\n\n".join(lines)
    if changes:
        text += "\n\nWhat would change the conclusion:\n\n" + "\n".join(f"- {c}" for c in changes)
    return text
