"""``collect``: aggregate a study's finished runs into tables (Markdown, JSON, CSV) and figures (PNG)."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning_spectral.experiments.files import write_csv, write_json
from lightning_spectral.experiments.report.budget import section_budget
from lightning_spectral.experiments.report.layer_norms import section_layer_norms
from lightning_spectral.experiments.report.lr_envelope import section_lr_envelope
from lightning_spectral.experiments.report.lr_sweep import section_lr_sweep
from lightning_spectral.experiments.report.metric_grid import section_metric_grid
from lightning_spectral.experiments.report.optimizer_table import section_optimizer_table
from lightning_spectral.experiments.report.solvers import section_solvers
from lightning_spectral.experiments.report.stats import group_results, load_results
from lightning_spectral.experiments.report.summary import summary_section
from lightning_spectral.experiments.report.width import section_width
from lightning_spectral.experiments.spec import Study, expand, get_dotted

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
    write_csv(report_dir / "runs.csv", flat)
    write_csv(report_dir / "summary.csv", [
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
