"""One command for every benchmark of issue 7 (and the callback overhead of issue 5).

    python -m benchmarks.run [--quick] [--out logs/benchmarks.json] [--threads 1] [--sections 1,2,3,4,5,6]

Prints Markdown tables of ratios (all measured in the same process, interleaved, medians of
repeats) and writes everything, raw times included, as JSON. ``--quick`` shrinks every shape
and repeat count for CI (a smoke test, its numbers mean nothing).

Threads: the default is one intra-op thread. On a 2-core machine shared with another job,
two OpenMP threads oversubscribe the cores and LAPACK calls collapse (measured here:
``svd`` of ``512 × 4608`` 0.48 s with one thread, 14 s with two), which would turn every
ratio involving an SVD or eigensolve into a measurement of the neighbour's load.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ._common import fmt, table, write_result

SECTIONS = {"1": "optimizer_step", "2": "msign_accuracy", "3": "inner_solvers", "4": "training_loop",
            "5": "callbacks", "6": "memory"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def environment(threads: int) -> dict:
    import lightning

    return {"torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
            "cpus": os.cpu_count(), "threads": threads, "load_avg": os.getloadavg()}


# -- rendering ------------------------------------------------------------------------------------
def render_optimizers(sec: dict) -> str:
    out = []
    for model, res in sec.items():
        title = {"mlp": "MLP 3072-256-256-10", "resnet18": "ResNet-18 (CIFAR)"}.get(model, model)
        out.append(f"**{title}** — {res['parameters'] / 1e6:.2f}M matrix parameters, NS-5 = {res['ns5_gflop']:.1f} GFLOP, "
                   f"floor at {res['floor_gflops_per_s']:.0f} GFLOP/s")
        rows = []
        for name, r in res["rows"].items():
            if "skipped" in r:
                rows.append([name, "—", "—", "—", "—", "—", "—", r["skipped"]])
                continue
            note = r["note"] + ("; 1 warm step timed (> 8 s cap)" if r["capped"] else "")
            rows.append([name, r["median_s"] * 1e3, r["over_floor"], r.get("over_torch_muon"), r["over_adamw"],
                         r.get("inner_iterations_mean"), r.get("state_bytes_per_param"), note])
        out.append(table(["optimizer", "ms/step", "÷ floor", "÷ torch.optim.Muon", "÷ AdamW", "inner its (mean)",
                          "state B/param", "notes"], rows))
    return "\n\n".join(out)


def render_targets(checks: list[dict]) -> str:
    rows = [[c["model"], c["target"], c["value"], c.get("iterations"), "met" if c["met"] else "**missed**"]
            for c in checks]
    return table(["shapes", "target", "measured", "inner its", "verdict"], rows)


def render_msign(sec: dict) -> str:
    by = {}
    for r in sec["rows"]:
        by.setdefault(r["schedule"], {})[r["steps"]] = r
    steps = sorted({r["steps"] for r in sec["rows"]})
    rows = []
    for schedule, d in by.items():
        rows.append([f"{schedule} σ≥1e-2"] + [d[s]["worst_err_1e-2"] for s in steps])
        rows.append([f"{schedule} σ≥1e-3"] + [d[s]["worst_err_1e-3"] for s in steps])
    first = next(iter(by.values()))
    rows.append(["time ÷ jordan-5"] + [first[s]["time_over_jordan5"] for s in steps])
    text = "worst |σᵢ − 1| over the test matrices (tall/wide/square, σ log-spaced to 1e-2 or 1e-3):\n\n"
    text += table(["schedule", *[f"{s} steps" for s in steps]], rows)
    rec = sec["recommendation"]
    text += "\n\n" + table(["need", "cheapest setting", "worst err"],
                           [[k, f"{v['schedule']} × {v['steps']}" if v else "none", v["err"] if v else None]
                            for k, v in rec.items()])
    return text


def render_inner(sec: dict) -> str:
    b = sec["budgeted"]
    rows = [[r["solver"], r["setting"], r["time_s"] * 1e3, r["iterations"], r["objective_gap"], r["tangent_residual"],
             r["norm_excess"]] for r in b["rows"]]
    text = (f"Budgeted step (tangent=True) on {b['shape'][0]}×{b['shape'][1]}, η = {b['budget']}, after {b['warm_steps']} "
            f"warm steps; reference ADMM tol=1e-10: {b['reference']['iterations']} its, {b['reference']['time_s']:.2f} s.\n\n")
    text += table(["solver", "setting", "ms", "its", "objective gap", "tangent residual", "norm excess"], rows)
    d = sec["directions"]
    rows = [[r["method"], r["setting"], r["time_s"] * 1e3, r["time_over_msign5"], r["iterations"], r["duality_gap"],
             r["residual"]] for r in d["rows"]]
    text += (f"\n\nManifold directions on {d['shape'][0]}×{d['shape'][1]} (warm started); one Jordan-5 msign = "
             f"{d['msign5_time_s'] * 1e3:.2f} ms.\n\n")
    text += table(["direction", "setting", "ms", "÷ msign-5", "its", "duality gap", "residual"], rows)
    return text


def render_loop(sec: dict) -> str:
    rows, notes = [], []
    for name, w in sec["workloads"].items():
        rows += [[f"{name}: plain PyTorch (SGD)", w["plain_step_s"] * 1e3, 1.0],
                 [f"{name}: SpectralModule + Trainer (SGD)", w["lightning_step_s"] * 1e3, w["ratio"]]]
        notes.append(f"{name}: {w['steps_per_epoch']} steps/epoch, per-step time = (T({w['epochs'][1]} ep) − "
                     f"T({w['epochs'][0]} ep))/extra steps, median of {w['repeats']} interleaved repeats.")
    return table(["loop", "ms/step", "ratio"], rows) + "\n\n" + " ".join(notes) + (
        f" Trainer start-up ≈ {sec['lightning_startup_s']:.2f} s.")


def render_callbacks(sec: dict) -> str:
    rows = []
    for name, r in sec["rows"].items():
        if "extra_per_step_s" not in r:
            continue
        rows.append([name, r["every_n_steps"], r["measurements"], r["fraction_of_step"], r["elapsed_fraction_of_step"],
                     r["elapsed_per_measurement_s"] * 1e3])
    return table(["callback", "every_n_steps", "measurements", "overhead (with − without)", "overhead (elapsed_s)",
                  "ms per measurement"], rows) + (
        f"\n\nFractions of a training step at the default frequency over {sec['steps']} steps (SmallCNN/digits; "
        "ConstraintMonitor against a ManifoldMuon baseline), median of "
        f"{sec['repeats']} interleaved repeats; the elapsed_s column is the callback's own bookkeeping.")


def render_memory(sec: dict) -> str:
    names = list(next(iter(sec.values()))["rows"])
    rows = []
    for name in names:
        cells = [sec[m]["rows"].get(name, {}).get("state_bytes_per_param") for m in sec]
        if any(c is not None for c in cells):
            rows.append([name, *cells])
    return table(["optimizer", *[f"{m} state B/param" for m in sec]], rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one repeat (CI smoke test)")
    parser.add_argument("--out", default="logs/benchmarks.json", help="JSON output path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="comma-separated subset of 1..6")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in wanted:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    result: dict = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "quick": args.quick, "environment": environment(args.threads), "sections": {}}
    sections = result["sections"]
    md: list[str] = []

    from . import inner_solvers, msign_accuracy, optimizers, training_loop

    if "1" in wanted or "6" in wanted:
        sec = optimizers.run(args.quick, _log)
        if "1" in wanted:
            sections["optimizer_step"] = sec
            sections["targets"] = optimizers.targets(sec)
            md += ["### 1. Optimizer step time", render_optimizers(sec), "Targets (issue 7):",
                   render_targets(sections["targets"])]
        if "6" in wanted:
            sections["memory"] = {m: {"rows": {k: {"state_bytes_per_param": r.get("state_bytes_per_param")}
                                               for k, r in res["rows"].items()}} for m, res in sec.items()}
            md += ["### 6. Optimizer state memory", render_memory(sections["memory"])]
    if "2" in wanted:
        sections["msign_accuracy"] = sec = msign_accuracy.run(args.quick, _log)
        md += ["### 2. msign accuracy against cost", render_msign(sec)]
    if "3" in wanted:
        sections["inner_solvers"] = sec = inner_solvers.run(args.quick, _log)
        md += ["### 3. Inner-solver frontier", render_inner(sec)]
    startup = 0.0
    if "4" in wanted:
        sections["training_loop"] = sec = training_loop.loop_overhead(args.quick, _log)
        startup = sec["lightning_startup_s"]
        md += ["### 4. Training-loop overhead", render_loop(sec)]
    if "5" in wanted:
        sections["callbacks"] = sec = training_loop.callback_overhead(args.quick, _log, startup)
        md += ["### 5. Callback overhead", render_callbacks(sec)]
    # Keep section order 1..6 in the printed text (6 was computed with 1).
    order = ["### 1.", "Targets", "### 2.", "### 3.", "### 4.", "### 5.", "### 6."]
    blocks = [(md[i], md[i + 1]) for i in range(0, len(md), 2)]
    blocks.sort(key=lambda b: next((j for j, o in enumerate(order) if b[0].startswith(o)), 99))
    result["wall_s"] = time.perf_counter() - started
    env = result["environment"]
    header = (f"Measured with `{result['command']}` — torch {env['torch']}, lightning {env['lightning']}, "
              f"{env['threads']} thread(s), CPU flags {', '.join(env['cpu_flags']) or 'n/a'}, "
              f"total {result['wall_s']:.0f} s.")
    text = "\n\n".join([header] + [f"{h}\n\n{b}" for h, b in blocks])
    result["markdown"] = text
    print(text)
    if args.out:
        path = Path(args.out)
        write_result(path, result, default=_json_default)
        _log(f"wrote {path}")
    return result


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
