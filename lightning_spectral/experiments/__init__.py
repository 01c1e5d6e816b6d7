"""Studies: grids of ordinary Lightning runs with resume, aggregation, figures and tables.

``python -m lightning_spectral study --config configs/studies/digits/<name>.yaml`` (see
:mod:`lightning_spectral.experiments.cli`). Layers: :mod:`~.spec` (study files and their grids)
→ :mod:`~.runner` (each run a fit built by :func:`lightning_spectral.spectral_cli.build_cli`,
recorded by :class:`lightning_spectral.callbacks.EpochRecorder`) → :mod:`~.report` (tables and
figures). :mod:`~.provenance` records where each result came from; :mod:`~.check` tells which
report pages are stale; :mod:`~.files` proves every path a study writes lies under its output
directory; :mod:`~.interrupt` stops a study on SIGTERM or SIGINT. :func:`lr_stability_scan` lives in :mod:`lightning_spectral.diagnostics` and is
re-exported here.
"""

from lightning_spectral.diagnostics.lr_scan import lr_stability_scan

__all__ = ["EpochRecorder", "Run", "Study", "collect", "expand", "load_study", "lr_stability_scan", "run_study"]


def __getattr__(name: str):  # lazy: `lr_stability_scan` alone must not import Lightning
    if name == "EpochRecorder":
        from lightning_spectral.callbacks.epoch_recorder import EpochRecorder

        return EpochRecorder
    if name in ("Run", "Study", "expand", "load_study"):
        from lightning_spectral.experiments import spec

        return getattr(spec, name)
    if name == "collect":
        from lightning_spectral.experiments.report import collect

        return collect
    if name == "run_study":
        from lightning_spectral.experiments.runner import run_study

        return run_study
    raise AttributeError(name)
