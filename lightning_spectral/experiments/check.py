"""``study --check``: does a committed report page still match what would produce it?

A page is current when it carries provenance (see :mod:`.provenance`), was collected from runs
made on a clean tree at commits where nothing the study depends on (the package, the study
file, its base config) has changed since, and records the same resolved-config hash for each
run the study file expands to. Anything else is stale, with the reasons listed.
"""

from __future__ import annotations

from pathlib import Path

from lightning_spectral.experiments import provenance as prov
from lightning_spectral.experiments.runner import resolved_config_hash
from lightning_spectral.experiments.spec import Study, expand

SHOWN = 8  # changed files listed per commit before "and N more"


def dependencies(study: Study) -> list[Path]:
    """The paths whose changes can change the study's numbers: the package, the study file and
    its base config (those inside the repository; git cannot tell about the others)."""
    paths = [prov.REPO_ROOT / "lightning_spectral"]
    if study.path is not None:
        paths.append(Path(study.path).resolve())
        base = study.raw.get("base")
        if isinstance(base, str):
            found = Path(study.path).parent / base
            paths.append((found if found.is_file() else Path(base)).resolve())
    return [p for p in paths if p.is_relative_to(prov.REPO_ROOT)]


def stale_reasons(study: Study, page: Path) -> list[str] | None:
    """Why ``page`` (a report of ``study``) is stale; an empty list when it is current, ``None``
    when there is no page."""
    if not page.exists():
        return None
    record = prov.read_page_provenance(page.read_text(encoding="utf-8"))
    if record is None:
        return [f"{page}: no provenance: stale (written before pages recorded their commit and config hashes)"]
    reasons = []
    if record.get("runs_dirty"):
        reasons.append("runs made from a tree with uncommitted changes (or of unknown state)")
    recorded = record.get("runs") or {}
    expected = {run.run_id: resolved_config_hash(study, run) for run in expand(study)}
    changed = sorted(r for r in expected if r in recorded and recorded[r] != expected[r])
    missing = sorted(set(expected) - set(recorded))
    extra = sorted(set(recorded) - set(expected))
    for what, ids in (("config changed", changed), ("not on the page", missing), ("no longer in the study", extra)):
        if ids:
            reasons.append(f"{len(ids)} run(s) {what}: {', '.join(ids[:SHOWN])}"
                           + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""))
    paths = dependencies(study)
    for commit in record.get("run_commits") or ["unknown"]:
        files = None if commit == "unknown" else prov.changed_since(commit, paths)
        if files is None:
            reasons.append(f"commit {commit[:12]}: git cannot compare it with the working tree")
        elif files:
            reasons.append(f"{len(files)} file(s) changed since {commit[:12]}: {', '.join(files[:SHOWN])}"
                           + (f" and {len(files) - SHOWN} more" if len(files) > SHOWN else ""))
    return [f"{page}: {r}" for r in reasons]
