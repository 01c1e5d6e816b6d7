"""The report sections of :mod:`lightning_spectral.experiments.report`, one test each, on small
synthetic results whose statistics are known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_spectral.experiments.report import SECTIONS, collect, group_results
from lightning_spectral.experiments.report.figures import pyplot, save_figure
from lightning_spectral.experiments.report.lr_envelope import section_lr_envelope
from lightning_spectral.experiments.report.stats import fmt, md_table
from lightning_spectral.experiments.report.summary import summary_section
from lightning_spectral.experiments.runner import run_dir
from lightning_spectral.experiments.spec import Run, Study, expand

pytest.importorskip("matplotlib")


def study(name: str = "syn", kind: str = "train", **report: Any) -> Study:
    base = {"data": {"class_path": "lightning_spectral.data.DigitsDataModule", "init_args": {"batch_size": 32}},
            "model": {"init_args": {"net": {"class_path": "lightning_spectral.models.MLP"}}},
            "trainer": {"max_epochs": 2}}
    return Study(name=name, kind=kind, path=None, base=base, seeds=[0, 1], grids=[], report=report)


def history(acc: float) -> list[dict[str, float]]:
    return [{"epoch": e, "val_acc": acc - 0.1 * (2 - e), "val_loss": 1.0 / e, "train_loss": 2.0 / e,
             "max_spectral_norm": 1.0 + e, "sharpness": 10.0 * e, "grad_noise_scale": 5.0 * e} for e in (1, 2)]


def result(seed: int, acc: float, **extra: Any) -> dict[str, Any]:
    return {"seed": seed, "status": "finished", "final_val_acc": acc, "final_train_loss": 1.0 - acc,
            "final_train_eval_acc": acc + 0.05, "mean_step_time_ms": 2.0, "history": history(acc), **extra}


def grid(*cells: tuple[dict[str, Any], list[float]], **extra: Any) -> list[tuple[Run, dict[str, Any]]]:
    """Results of runs whose axes are ``{axis: (name, value)}``, one per accuracy in the list (seed = index)."""
    out = []
    for axes, accs in cells:
        for seed, acc in enumerate(accs):
            names = {k: v[0] for k, v in axes.items()}
            run_id = "__".join(f"{k}={v}" for k, v in names.items()) + f"__seed={seed}"
            out.append((Run(run_id, names, {k: v[1] for k, v in axes.items()}, seed, {}), result(seed, acc, **extra)))
    return out


def lines(markdown: str, prefix: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(prefix)]


def test_save_figure_writes_the_png_and_closes_the_figure(tmp_path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    assert save_figure(fig, tmp_path / "a.png") == "a.png"
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()


def test_fmt_and_md_table() -> None:
    assert fmt({"mean": 0.5, "std": 0.1, "n": 2}, 100) == "50.00 ± 10.00"
    assert fmt({"mean": 0.5, "std": math.nan, "n": 1}, 100) == "50.00" and fmt(None) == "–"
    assert md_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_metric_grid(tmp_path: Path) -> None:
    groups = group_results(grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7])))
    text, figures = SECTIONS["metric_grid"](study(), groups, tmp_path, {})
    assert figures == ["syn_metrics.png"] and (tmp_path / "syn_metrics.png").stat().st_size > 0
    assert "![metrics](syn_metrics.png)" in text


def test_summary_counts_seeds_and_divergence() -> None:
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]), ({"optimizer": ("Muon", "Muon")}, [0.9]))
    results[1][1]["status"] = "diverged"
    text = summary_section(group_results(results), {})
    sgd, muon = lines(text, "| SGD"), lines(text, "| Muon")
    assert sgd[0].startswith("| SGD | 2 (1 diverged) | 60.00 ± 14.14 |")
    assert muon[0].startswith("| Muon | 1 | 90.00 |")


def test_budget_rows_follow_the_budget(tmp_path: Path) -> None:
    groups = group_results(grid(({"budget": ("1", 1.0)}, [0.8, 0.6]), ({"budget": ("0.1", 0.1)}, [0.5])))
    text, figures = SECTIONS["budget"](study(), groups, tmp_path, {"axis": "budget"})
    assert figures == ["syn_budget.png"] and (tmp_path / figures[0]).exists()
    rows = lines(text, "| 0.1") + lines(text, "| 1 ")
    assert rows == ["| 0.1 | 50.00 | 0.500 | – |", "| 1 | 70.00 ± 14.14 | 0.300 ± 0.141 | – |"]
    assert text.index("| 0.1 |") < text.index("| 1 |")


def test_width_spread_and_best_lr(tmp_path: Path) -> None:
    cells = []
    for opt in ("SGD", "Muon"):
        for width, accs in ((1.0, {0.1: 0.6, 0.3: 0.7}), (2.0, {0.1: 0.8, 0.3: 0.5})):
            for lr, acc in accs.items():
                cells.append(({"optimizer": (opt, opt), "width": (f"{width:g}", width), "lr": (f"{lr:g}", lr)}, [acc]))
    groups = group_results(grid(*cells))
    text, figures = SECTIONS["width"](study(), groups, tmp_path, {"reference_lr": {"SGD": 0.1, "Muon": 0.3}})
    assert figures == ["syn_width.png"]
    # SGD at lr 0.1: 60 % and 80 % → sample std 14.14 pp, range 20 pp; Muon at 0.3: 70 % and 50 %.
    assert "| SGD | 0.1 | 60.00 | 80.00 | 14.14 | 20.00 |" in text
    assert "| Muon | 0.3 | 70.00 | 50.00 | 14.14 | 20.00 |" in text
    assert "| SGD | 0.3 | 0.1 |" in text  # the best lr moves from 0.3 (width 1) to 0.1 (width 2)


def test_lr_envelope(tmp_path: Path) -> None:
    lrs = [0.01, 0.1, 1.0]
    scans = [
        ({"optimizer": ("SGD", "SGD")}, {"lr_values": lrs, "converged": [True, True, False],
                                         "final_losses": [0.5, 0.25, math.inf], "max_stable_lr": 0.1}),
        ({"optimizer": ("SGD", "SGD")}, {"lr_values": lrs, "converged": [True, False, False],
                                         "final_losses": [0.75, math.inf, math.inf], "max_stable_lr": 0.01}),
    ]
    results = [(Run(f"optimizer=SGD__seed={s}", {"optimizer": "SGD"}, {"optimizer": "SGD"}, s, {}), {"seed": s, **r})
               for s, (_, r) in enumerate(scans)]
    text, figures = section_lr_envelope(study(kind="lr_scan"), results, tmp_path, {})
    assert figures == ["syn_envelope.png"] and (tmp_path / figures[0]).exists()
    assert "| SGD | 2 | 0.055 ± 0.064 | 0.1 | 0.1 |" in text  # mean/std of 0.1 and 0.01; 0.1 converged once
    assert "| 0.01 | 0.625 |" in text and "| 0.1 | 0.250 (1/2 diverged) |" in text and "| 1 | diverged |" in text
    assert section_lr_envelope(study(kind="lr_scan"), [], tmp_path, {}) == (
        "## Stability envelope\n\nNo finished runs yet.", [])


def test_lr_sweep_orders_rows_by_value_whatever_the_labels(tmp_path: Path) -> None:
    """Rows follow the learning rate, not its label: labels that are not numbers work (they raised
    ValueError when the rows were sorted by ``float(label)``)."""
    groups = group_results(grid(
        ({"method": ("A", "A"), "lr": ("large", 1.0)}, [0.5]),
        ({"method": ("A", "A"), "lr": ("small", 0.01)}, [0.7, 0.9]),
        ({"method": ("B", "B"), "lr": ("small", 0.01)}, [0.6]),
    ))
    text, figures = SECTIONS["lr_sweep"](study(), groups, tmp_path, {})
    assert figures == ["syn_lr_sweep.png"]
    assert lines(text, "| small") == ["| small | 80.00 ± 14.14 (85.00 ± 14.14) | 60.00 (65.00) |"]
    assert lines(text, "| large") == ["| large | 50.00 (55.00) | – |"]
    assert text.index("| small |") < text.index("| large |")


def test_layer_norms_select_and_extra(tmp_path: Path) -> None:
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]), ({"optimizer": ("Muon", "Muon")}, [0.9]),
                   ({"optimizer": ("Adam", "Adam")}, [0.4]))
    for i, (_, r) in enumerate(results):
        r["final_spectral_norms"] = {"net.fc1": 1.0 + i, "net.fc2": 2.0}
    groups = group_results(results)
    text, figures = SECTIONS["layer_norms"](study(), groups, tmp_path, {"select": {"optimizer": "SGD"},
                                                                        "extra": ["optimizer=Muon"], "title": "T"})
    assert text.startswith("## T") and figures == ["syn_layer_norms.png"]
    assert lines(text, "| SGD")[0].endswith("| 1.500 ± 0.707 | 2.000 ± 0.000 |")
    assert lines(text, "| Muon")[0].endswith("| 3.000 | 2.000 |") and not lines(text, "| Adam")
    assert SECTIONS["layer_norms"](study(), groups, tmp_path, {"select": {"optimizer": "none"}}) == ("", [])


def test_solvers(tmp_path: Path) -> None:
    groups = group_results(grid(({"solver": ("exact", "exact")}, [0.5, 0.7]),
                                final_solver_inner_iterations=4.0, final_solver_inner_residual=1e-3))
    text, figures = SECTIONS["solvers"](study(), groups, tmp_path, {})
    assert figures == ["syn_solver_cost.png"]
    assert "| exact | 60.00 ± 14.14 | 2.0 ± 0.0 | 4 ± 0 | 0.001 ± 0 |" in text


def test_optimizer_table_best_first_with_notes(tmp_path: Path) -> None:
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]), ({"optimizer": ("Muon", "Muon")}, [0.9]))
    results[0][1]["status"] = "diverged"
    opts = {"notes": {"SGD": "baseline"}}
    text, figures = SECTIONS["optimizer_table"](study(), group_results(results), tmp_path, opts)
    assert figures == []
    rows = lines(text, "| **Muon**") + lines(text, "| SGD")
    assert rows == ["| **Muon** | **0.1** | **90.00%** |  |",
                    "| SGD | 0.4 ± 0.14 | 60.00 ± 14.14% | baseline; 1/2 runs diverged |"]
    assert text.index("Muon") < text.index("| SGD")
    assert (tmp_path / "table.md").read_text().strip() == text[text.index("| Optimizer"):].strip()
    table = json.loads((tmp_path / "table.json").read_text())
    assert [row["optimizer"] for row in table] == ["Muon", "SGD"] and table[1]["seeds"] == [0, 1]


def test_collect_writes_the_report_of_the_requested_sections(tmp_path: Path) -> None:
    s = study(sections=["metric_grid", {"type": "budget", "axis": "optimizer"}])
    s.grids = [{"optimizer": {"key": "x", "values": [0.5, 2.0]}}]
    s.seeds = [0]
    for run, acc in zip(expand(s), (0.6, 0.8)):
        directory = run_dir(s, run, tmp_path)
        directory.mkdir(parents=True)
        (directory / "result.json").write_text(json.dumps(result(run.seed, acc)))
    report = collect(s, tmp_path, docs_dir=tmp_path / "docs")
    summary = (report / "summary.md").read_text()
    assert "**Runs:** 2 of 2 finished" in summary and "## Budget sweep" in summary and "## Summary" in summary
    assert sorted(p.name for p in report.glob("*.png")) == ["syn_budget.png", "syn_metrics.png"]
    assert (report / "runs.csv").read_text().count("\n") == 3 and (report / "summary.csv").exists()
    docs = (tmp_path / "docs" / "syn.md").read_text()
    assert "](figures/syn_budget.png)" in docs and (tmp_path / "docs" / "figures" / "syn_metrics.png").exists()
