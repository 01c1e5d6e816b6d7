"""A study's report: tables (Markdown, JSON, CSV) and figures (PNG and SVG) from its finished runs.

:func:`collect` writes the report; ``report.sections`` of the study file chooses its sections,
one module each: ``metric_grid`` (per-epoch curves), ``budget``, ``width``, ``lr_sweep``,
``layer_norms``, ``solvers``, ``optimizer_table``, ``lm`` (language models: each optimizer at its
best learning rate, steps and seconds to a target loss, loss at equal wall time); an ``lr_scan``
study gets ``lr_envelope``; every training study ends with the ``summary`` table; every page then
gets the parameter ``routing`` of each series and its provenance
(:mod:`lightning_spectral.experiments.provenance`). A section is a function
``(study, groups, report_dir, opts) -> (markdown, [png names])`` registered in
:data:`~lightning_spectral.experiments.report.collect.SECTIONS`; it draws with the functions of
:mod:`~lightning_spectral.experiments.report.figures` and tabulates with those of
:mod:`~lightning_spectral.experiments.report.stats`.
"""

from lightning_spectral.experiments.report.collect import SECTIONS, collect
from lightning_spectral.experiments.report.stats import group_results, load_results, mean_std

__all__ = ["SECTIONS", "collect", "group_results", "load_results", "mean_std"]
