"""``collect``: aggregate a study's finished runs into tables (Markdown, JSON, CSV), figures (PNG
and SVG), the parameter routing and the provenance of the page."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning_spectral.experiments.files import inside, write_csv, write_json
from lightning_spectral.experiments.provenance import REPO_ROOT, page_line, provenance
from lightning_spectral.experiments.report.budget import section_budget
from lightning_spectral.experiments.report.figures import log_figures_to_tensorboard
from lightning_spectral.experiments.report.layer_norms import section_layer_norms
from lightning_spectral.experiments.report.lm import section_lm
from lightning_spectral.experiments.report.lr_envelope import section_lr_envelope
from lightning_spectral.experiments.report.lr_sweep import section_lr_sweep
from lightning_spectral.experiments.report.metric_grid import section_metric_grid
from lightning_spectral.experiments.report.optimizer_table import section_optimizer_table
from lightning_spectral.experiments.report.solvers import section_solvers
from lightning_spectral.experiments.report.routing import routing_section
from lightning_spectral.experiments.report.stats import group_results, label, load_results
from lightning_spectral.experiments.report.summary import summary_section
from lightning_spectral.experiments.report.width import section_width
from lightning_spectral.experiments.runner import study_dir
from lightning_spectral.experiments.spec import Study, check_name, expand, get_dotted

SECTIONS = {
    "metric_grid": section_metric_grid, "budget": section_budget, "width": section_width,
    "lr_sweep": section_lr_sweep, "layer_norms": section_layer_norms, "solvers": section_solvers,
    "optimizer_table": section_optimizer_table, "lm": section_lm,
}


def _setup_line(study: Study) -> str:
    """The page's setup line: the study's own ``report.setup`` text, or one derived from the base config."""
    if study.report.get("setup"):
        return str(study.report["setup"]).strip().rstrip(".")
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


def study_file(study: Study) -> str | None:
    """The study file's path, relative to the repository when it lies inside it."""
    if study.path is None:
        return None
    path = Path(study.path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def page_provenance(study: Study, results) -> dict:
    """This collect's :func:`provenance`, the study file, the commits the runs were made at and
    each run's resolved-config hash (what ``study --check`` compares)."""
    record = provenance()
    runs = [r.get("provenance") or {} for _, r in results]
    record.update({
        "study": study.name, "study_file": study_file(study),
        "run_commits": sorted({p.get("commit") or "unknown" for p in runs}),
        "runs_dirty": any(p.get("dirty") is not False for p in runs),
        "runs": {run.run_id: r.get("resolved_config_hash") for run, r in results},
    })
    return record


def provenance_section(record: dict) -> str:
    tree = {True: "**with uncommitted changes**", False: "clean tree", None: "tree state unknown"}[record["dirty"]]
    runs = ", ".join(f"`{c[:12]}`" for c in record["run_commits"]) or "–"
    return (f"## Provenance\n\nCollected at commit `{record['commit'] or 'unknown'}` ({tree}) on "
            f"{record['time_utc']}; lightning_spectral {record['lightning_spectral']}, torch {record['torch']}, "
            f"lightning {record['lightning']}, Python {record['python']}.\n"
            f"Command: `{record['command']}`.\n"
            f"Runs made at commit(s) {runs}" + (" (some from a tree with uncommitted changes)" if record["runs_dirty"]
                                                   else "") + ". "
            "Each run's resolved-config hash is in `results.json` (`resolved_config_hash`); "
            f"`python -m lightning_spectral study --config {record['study_file'] or '<study file>'} --check` "
            "tells whether this page still matches the code and config that would produce it.")


def collect(study: Study, out_dir: str | Path, report_dir: str | Path | None = None,
            command: str | None = None, docs_dir: str | Path | None = None) -> Path:
    """Aggregate the finished runs into ``report_dir`` (default ``<out_dir>/<study>/report``):
    ``summary.md``, ``results.json`` (every run incl. history, and per-series statistics and
    per-epoch mean/std curves), ``runs.csv``, ``summary.csv``, the figures and, in
    ``report/tensorboard``, the same figures as TensorBoard images. With ``docs_dir``
    also writes ``<docs_dir>/<study>.md`` and its figures (PNG and SVG) under ``<docs_dir>/figures/``."""
    out_dir, name = Path(out_dir), check_name(study.name, "the study name")
    report_dir = Path(report_dir) if report_dir else study_dir(study, out_dir) / "report"
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
    parts.append(routing_section(groups, label))
    record = page_provenance(study, results)
    parts += [provenance_section(record), page_line(record)]
    markdown = "\n\n".join(p for p in parts if p) + "\n"
    (report_dir / "summary.md").write_text(markdown)
    log_figures_to_tensorboard(report_dir, figures, study.name)
    flat = []
    for run, r in results:
        flat.append({k: v for k, v in r.items()
                     if k not in ("history", "axes", "values", "routing") and not isinstance(v, (dict, list))}
                    | {f"axis_{k}": v for k, v in run.axes.items()})
    write_json(report_dir / "results.json", {
        "study": study.name, "description": study.description, "provenance": record, "runs": [r for _, r in results],
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
            for file in (fig, Path(fig).with_suffix(".svg").name):
                if (report_dir / file).exists():
                    shutil.copyfile(inside(report_dir, file, what="a figure"),
                                    inside(docs, "figures", file, what="a page's figure"))
            markdown = markdown.replace(f"]({fig})", f"](figures/{fig})")
        inside(docs, f"{name}.md", what="the page").write_text(markdown)
    return report_dir
