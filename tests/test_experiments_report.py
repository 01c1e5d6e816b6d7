"""The report sections of :mod:`lightning_spectral.experiments.report`, one test each, on small
synthetic results whose statistics are known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_spectral.experiments.report import SECTIONS, collect, group_results
from lightning_spectral.experiments.report.figures import pyplot, save_figure, wants_log
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


def test_save_figure_writes_png_at_150_dpi_and_svg_and_drops_empty_panels(tmp_path: Path) -> None:
    from PIL import Image

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4, 2))
    axes[0].plot([1, 2], [3, 4])  # axes[1] draws nothing
    assert save_figure(fig, tmp_path / "a.png", dpi=64) == "a.png"  # a lower dpi is raised to the minimum
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "a.png") as image:
        assert min(image.info["dpi"]) >= 150 - 0.5
        assert image.size[0] >= 4 * 150 - 1  # 4 inches wide at 150 dpi
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml") and "<svg" in (tmp_path / "a.svg").read_text()
    assert len(fig.axes) == 1  # the empty panel was removed
    assert fig.number not in plt.get_fignums()


def test_wants_log_only_for_positive_values_spanning_orders_of_magnitude() -> None:
    assert wants_log([60.0, 7400.0]) and wants_log([1e-6, 1e-3, math.nan])
    assert not wants_log([60.0, 90.0]) and not wants_log([-1.0, 100.0]) and not wants_log([0.0, 50.0])
    assert not wants_log([])


def test_solver_step_times_spanning_orders_of_magnitude_get_a_log_axis(tmp_path: Path, monkeypatch) -> None:
    saved = {}
    monkeypatch.setattr("lightning_spectral.experiments.report.solvers.save_figure",
                        lambda fig, path: saved.setdefault("fig", fig) and path.name)
    results = grid(({"solver": ("fast", "fast")}, [0.5]), ({"solver": ("slow", "slow")}, [0.5]))
    results[0][1]["mean_step_time_ms"], results[1][1]["mean_step_time_ms"] = 60.0, 7400.0
    SECTIONS["solvers"](study(), group_results(results), tmp_path, {})
    axes = saved["fig"].axes
    assert axes[0].get_yscale() == "log"
    assert [ax.has_data() for ax in axes] == [True, False, False]  # no solver metrics: removed when saved
    pyplot().close(saved["fig"])


def test_fmt_and_md_table() -> None:
    assert fmt({"mean": 0.5, "std": 0.1, "n": 2}, 100) == "50.00 ± 10.00"
    assert fmt({"mean": 0.5, "std": math.nan, "n": 1}, 100) == "50.00" and fmt(None) == "–"
    assert md_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_metric_grid(tmp_path: Path) -> None:
    groups = group_results(grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7])))
    text, figures = SECTIONS["metric_grid"](study(), groups, tmp_path, {})
    assert figures == ["syn_metrics.png"] and (tmp_path / "syn_metrics.png").stat().st_size > 0
    assert "![metrics](syn_metrics.png)" in text


def test_metric_grid_draws_only_recorded_metrics_log_where_they_span_orders(tmp_path: Path, monkeypatch) -> None:
    saved = {}
    monkeypatch.setattr("lightning_spectral.experiments.report.metric_grid.save_figure",
                        lambda fig, path: saved.setdefault("fig", fig))
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]))
    for _, r in results:  # two metrics only; the training loss falls 1000-fold
        r["history"] = [{"epoch": e, "val_acc": 0.5, "train_loss": 10.0 ** -e} for e in (0, 1, 2, 3)]
    SECTIONS["metric_grid"](study(), group_results(results), tmp_path, {})
    fig = saved["fig"]
    assert [ax.get_title() for ax in fig.axes] == ["Validation accuracy", "Training loss"]
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log"]
    pyplot().close(fig)


def test_summary_counts_seeds_and_divergence() -> None:
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]), ({"optimizer": ("Muon", "Muon")}, [0.9]))
    results[1][1]["status"] = "diverged"
    text = summary_section(group_results(results), {})
    sgd, muon = lines(text, "| SGD"), lines(text, "| Muon")
    assert sgd[0].startswith("| SGD | 2 (1 diverged) | 60.00 ± 14.14 |")
    assert muon[0].startswith("| Muon | 1 | 90.00 |")
    header = lines(text, "| Series")[0]
    assert "Val acc % (final)" in header and "Sharpness" not in header and "GNS" not in header  # no run recorded them
    assert len(header.split("|")) == len(sgd[0].split("|"))


def test_generalization_gap_is_train_eval_minus_held_out_accuracy() -> None:
    results = grid(({"optimizer": ("SGD", "SGD")}, [0.5, 0.7]))
    results[0][1]["final_train_eval_acc"] = 0.9  # gaps 0.4 and 0.05 (0.75 - 0.7)
    gap = group_results(results)["optimizer=SGD"]["stats"]["generalization_gap"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(0.225) and gap["std"] == pytest.approx(0.35 / math.sqrt(2))
    text = summary_section(group_results(results), {"columns": [{"key": "generalization_gap", "title": "Gap"}]})
    assert "| Gap |" in lines(text, "| Series")[0] and lines(text, "| SGD")[0].endswith("| 0.225 ± 0.25 |")
    no_train_eval = grid(({"optimizer": ("SGD", "SGD")}, [0.5]))
    del no_train_eval[0][1]["final_train_eval_acc"]
    assert "generalization_gap" not in group_results(no_train_eval)["optimizer=SGD"]["stats"]


def test_figures_logged_to_tensorboard_as_images_replacing_an_earlier_collect(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_spectral.experiments.report.figures import log_figures_to_tensorboard

    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 12), (0, 0, 255)).save(tmp_path / "b.png")
    assert log_figures_to_tensorboard(tmp_path, ["missing.png"], "syn") is None
    for _ in range(2):
        log_dir = log_figures_to_tensorboard(tmp_path, ["a.png", "b.png", "missing.png"], "syn")
    assert len(list(log_dir.glob("events.*"))) == 1
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["syn/a", "syn/b"]
    image = events.Images("syn/a")
    assert len(image) == 1 and (image[0].width, image[0].height) == (30, 20)


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
    results = grid(({"solver": ("exact", "exact")}, [0.5, 0.7]),
                   final_solver_inner_iterations=4.0, final_solver_inner_residual=1e-3, final_solver_closed_form=0.0)
    results += grid(({"solver": ("clip", "clip")}, [0.6]), final_solver_inner_iterations=0.0,
                    final_solver_inner_residual=0.0, final_solver_closed_form=1.0)
    text, figures = SECTIONS["solvers"](study(), group_results(results), tmp_path, {})
    assert figures == ["syn_solver_cost.png"]
    assert "| exact | 60.00 ± 14.14 | 2.0 ± 0.0 | 4 ± 0 | 0.001 ± 0 | no |" in text
    assert "| clip | 60.00 | 2.0 | 0 | 0 | yes |" in text


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
    assert len(list((report / "tensorboard").glob("events.*"))) == 1  # the figures as TensorBoard images


def test_setup_line_from_the_base_config_or_the_study_s_own_text() -> None:
    from lightning_spectral.experiments.report.collect import _setup_line

    derived = _setup_line(study())
    assert "data `DigitsDataModule` (batch 32)" in derived and "2 epochs" in derived and "seeds [0, 1]" in derived
    assert _setup_line(study(setup="300 steps, validation every 25.\n")) == "300 steps, validation every 25"


# -- a real tiny study: provenance, routing, HParams, --check --------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def tiny_study(tmp_path: Path, lr: float = 0.05) -> Path:
    """Two runs (SGD, MuonSGD), 2 epochs of 2 batches on digits."""
    import yaml

    optimizers = [{"name": name, "set": {"model.init_args.optimizer": {"class_path": path, "init_args": args}}}
                  for name, path, args in (("SGD", "torch.optim.SGD", {"lr": lr}),
                                           ("MuonSGD", "lightning_spectral.optim.MuonSGD",
                                            {"lr": lr, "spectral_budget": 0.1}))]
    spec = {"name": "tiny", "base": str(ROOT / "configs" / "quickstart.yaml"),
            "set": {"trainer.max_epochs": 2, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
                    "trainer.accelerator": "cpu", "data.init_args.batch_size": 16},
            "seeds": [0], "grids": [{"optimizer": optimizers}],
            "diagnostics": {"sharpness": False, "noise_scale": False}, "report": {"sections": ["metric_grid"]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class FakeGit:
    """``git`` answers of a clean checkout at commit ``c0ffee`` whose later changes are ``changed``."""

    def __init__(self) -> None:
        self.changed: list[str] = []

    def __call__(self, *args: str, cwd: Any = None) -> str | None:
        if args == ("rev-parse", "--show-toplevel"):
            return str(ROOT)
        answers = {"rev-parse": "c0ffee", "status": "", "cat-file": "", "ls-files": "",
                   "diff": "\n".join(self.changed)}
        return answers[args[0]]


def test_tiny_study_records_provenance_routing_hparams_and_check_tells_stale_pages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from lightning_spectral.experiments import provenance as prov
    from lightning_spectral.experiments.check import stale_reasons
    from lightning_spectral.experiments.cli import study_main
    from lightning_spectral.experiments.runner import run_study
    from lightning_spectral.experiments.spec import load_study

    fake = FakeGit()
    monkeypatch.setattr(prov, "git", fake)
    path = tiny_study(tmp_path)
    s = load_study(path)
    assert run_study(s, tmp_path / "out", log=lambda _: None)["failed"] == []
    collect(s, tmp_path / "out", docs_dir=tmp_path / "docs")

    # result.json: provenance, the resolved-config hash, the routing of the fit's optimizer
    muon = json.loads((run_dir(s, expand(s)[1], tmp_path / "out") / "result.json").read_text())
    assert muon["provenance"]["commit"] == "c0ffee" and muon["provenance"]["dirty"] is False
    assert {"torch", "lightning", "lightning_spectral", "python", "command"} <= set(muon["provenance"])
    assert len(muon["resolved_config_hash"]) == 16
    routed = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in muon["routing"].splitlines()[2:]}
    assert routed["fc1.weight"] == "MuonSGD" and routed["fc2.weight"] == "fallback sgd"

    # the page: a routing table per series and a provenance line with every run's hash
    page = (tmp_path / "docs" / "tiny.md").read_text()
    assert "## Parameter routing" in page and "**MuonSGD**" in page and "## Provenance" in page
    record = prov.read_page_provenance(page)
    assert record["commit"] == "c0ffee" and record["run_commits"] == ["c0ffee"]
    assert record["runs"] == {r.run_id: json.loads((run_dir(s, r, tmp_path / "out") / "result.json").read_text())
                              ["resolved_config_hash"] for r in expand(s)}
    results = json.loads((tmp_path / "out" / "tiny" / "report" / "results.json").read_text())
    assert results["provenance"] == record

    # TensorBoard's HParams view: one entry per run, HParamsSummary's (the form of every `fit`) with the axis labels
    events = EventAccumulator(str(run_dir(s, expand(s)[1], tmp_path / "out") / "tensorboard" / "version_0"))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer"].string_value == "MuonSGD"
    assert start.hparams["optimizer/spectral_budget"].number_value == pytest.approx(0.1)
    assert start.hparams["axis/optimizer"].string_value == "MuonSGD" and start.hparams["seed"].number_value == 0
    assert start.hparams["lr/matrix"].number_value == pytest.approx(0.05)  # the resolved groups', as for `fit`
    assert start.hparams["batch_size"].number_value == 16 and start.hparams["data"].string_value == "DigitsDataModule"
    assert events.Scalars("hparams/final_val_acc")[-1].value == pytest.approx(muon["final_val_acc"])
    assert events.Scalars("hparams/best_val_acc")[-1].value == pytest.approx(muon["best_val_acc"])
    assert len(events.Scalars("hparams/final_val_acc")) == 1  # one entry: no second one after the fit

    # --check: current; then a changed config, a changed package file, a page without provenance
    docs = tmp_path / "docs" / "tiny.md"
    assert stale_reasons(s, docs) == []
    assert study_main(["--config", str(path), "--docs", str(tmp_path / "docs"), "--check"]) == 0
    assert "current:" in capsys.readouterr().out
    changed = load_study(tiny_study(tmp_path, lr=0.1))
    assert any("2 run(s) config changed" in r for r in stale_reasons(changed, docs))
    fake.changed = ["lightning_spectral/optim/solvers.py"]
    assert any("1 file(s) changed since c0ffee: lightning_spectral/optim/solvers.py" in r
               for r in stale_reasons(s, docs))
    docs.write_text(page.split("## Provenance")[0])
    assert stale_reasons(s, docs) == [f"{docs}: no provenance: stale (written before pages recorded their commit "
                                      "and config hashes)"]
    assert study_main(["--config", str(path), "--docs", str(tmp_path / "docs"), "--check"]) == 1
    assert "no provenance: stale" in capsys.readouterr().out


def test_check_calls_the_committed_pages_without_provenance_stale(capsys) -> None:
    from lightning_spectral.experiments.cli import study_main

    status = study_main(["--config", str(ROOT / "configs" / "studies" / "digits"), "--docs",
                         str(ROOT / "docs" / "results"), "--check"])
    out = capsys.readouterr().out
    pages = {p.stem for p in (ROOT / "docs" / "results").glob("*.md")} - {"README"}
    unmarked = [p for p in pages if "<!-- provenance: " not in (ROOT / "docs" / "results" / f"{p}.md").read_text()]
    for name in unmarked:
        assert f"stale: {ROOT / 'docs' / 'results' / name}.md\n  no provenance: stale" in out
    assert status == (1 if unmarked or "stale:" in out else 0)
