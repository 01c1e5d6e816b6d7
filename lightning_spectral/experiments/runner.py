"""Running a study: each run an ordinary Lightning fit in its own directory, skipped once finished.

Layout under ``<out_dir>/<study>/``::

    runs/<run_id>/run.yaml        the complete LightningCLI config of the run (``fit --config`` it by hand)
    runs/<run_id>/tensorboard/    its TensorBoard log (``tensorboard --logdir <out_dir>/<study>/runs``);
                                  an earlier attempt's in tensorboard.stale-<time> when the run restarted
    runs/<run_id>/checkpoints/    last.ckpt while it runs (deleted when it finishes, unless keep_checkpoints),
                                  and config_hash: the config the checkpoints were written for
    runs/<run_id>/.lock           held while a process trains the run
    runs/<run_id>/history.json    per-epoch metrics (also .csv)
    runs/<run_id>/result.json     written last: the run is finished when this exists (and matches run.yaml);
                                  it records its provenance (commit, dirty tree, versions, command), the
                                  hash of the resolved config and the parameter routing table
    report/                       collect's tables (Markdown, JSON, CSV) and figures (PNG and SVG)

A run is finished when ``result.json`` exists and records the hash of the current config; a
changed config makes it pending again. An interrupted run restarts; if it left a checkpoint of
the same config that loads (``last.ckpt``, else the newest other one) it resumes from there
(model, optimizer, scheduler, callbacks and the recorded epochs) and appends to its TensorBoard
log; checkpoints of a changed config, and damaged files, are moved aside with a message, and a
run that starts from scratch moves the earlier attempt's TensorBoard log aside
(``tensorboard.stale-<UTC time>``), so that ``version_0`` never mixes two configs.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_spectral.callbacks.epoch_recorder import EpochRecorder
from lightning_spectral.checkpoint import _aside_name, resume_checkpoint, run_lock, write_config_marker
from lightning_spectral.experiments import interrupt
from lightning_spectral.experiments.files import inside, write_json
from lightning_spectral.experiments.provenance import provenance
from lightning_spectral.experiments.spec import DIAGNOSTIC_DEFAULTS, Run, Study, check_name, config_hash, expand
from lightning_spectral.spectral_cli import add_hparams_summary, build_cli


def study_dir(study: Study, out_dir: str | Path) -> Path:
    """``<out_dir>/<study name>``, proven to lie under ``out_dir`` (everything a study writes is below it)."""
    return inside(out_dir, check_name(study.name, "the study name"), what="the study directory")


def run_dir(study: Study, run: Run, out_dir: str | Path) -> Path:
    """``<out_dir>/<study>/runs/<run id>``: the run's config, logs, checkpoints and TensorBoard log."""
    return inside(out_dir, check_name(study.name, "the study name"), "runs", check_name(run.run_id, "the run id"),
                  what="the run directory")


def diagnostics(study: Study) -> dict[str, Any]:
    return {**DIAGNOSTIC_DEFAULTS, **study.diagnostics}


def full_config(study: Study, run: Run, out_dir: str | Path) -> dict[str, Any]:
    """The run's LightningCLI config with the study's logger, checkpoint and diagnostic callbacks."""
    config = dict(run.config)
    directory = run_dir(study, run, out_dir)
    diag = diagnostics(study)
    every = {"every_n_epochs": int(diag["every_n_epochs"])}
    callbacks: list[dict[str, Any]] = []
    if diag["spectral"]:
        callbacks.append({"class_path": "lightning_spectral.callbacks.SpectralNormMonitor",
                          "init_args": {**every, "method": "svd", "log_histograms": False}})
    if diag["sharpness"]:
        callbacks.append({"class_path": "lightning_spectral.callbacks.SharpnessMonitor", "init_args": dict(every)})
    if diag["noise_scale"]:
        callbacks.append({"class_path": "lightning_spectral.callbacks.GradientNoiseScaleMonitor",
                          "init_args": {**every, "mode": "split", "ema_decay": float(diag["noise_scale_ema"])}})
    if diag["constraint"]:
        callbacks.append({"class_path": "lightning_spectral.callbacks.ConstraintMonitor",
                          "init_args": {"every_n_steps": 10}})
    callbacks.append({"class_path": "lightning_spectral.callbacks.EpochRecorder",
                      "init_args": {"out_dir": str(directory), "final_train_eval": bool(diag["final_train_eval"])}})
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": True}})
    trainer = dict(config.get("trainer", {}))
    trainer.update({
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(directory), "name": "tensorboard", "version": 0,
                                 "default_hp_metric": False}},
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    })
    trainer.setdefault("log_every_n_steps", 10)
    config["trainer"] = trainer
    return config


def is_finished(directory: Path, expected_hash: str) -> bool:
    result = directory / "result.json"
    if not result.exists():
        return False
    try:
        return json.loads(result.read_text()).get("config_hash") == expected_hash
    except (OSError, ValueError):
        return False


def run_hash(study: Study, run: Run, out_dir: str | Path) -> str:
    if study.kind == "lr_scan":
        return config_hash({"config": run.config, "scan": study.scan})
    return config_hash(full_config(study, run, out_dir))


def resolved_config_hash(study: Study, run: Run) -> str:
    """The hash of what decides a run's numbers: its resolved config and the study's diagnostics
    (or scan), without the directories the runner adds, so it is the same under any ``out_dir``."""
    if study.kind == "lr_scan":
        return config_hash({"config": run.config, "scan": study.scan})
    return config_hash({"config": run.config, "diagnostics": diagnostics(study)})


def pending_runs(study: Study, out_dir: str | Path) -> list[Run]:
    return [r for r in expand(study) if not is_finished(run_dir(study, r, out_dir), run_hash(study, r, out_dir))]


def _summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    finals = {f"final_{k}": v for k, v in last.items() if k not in ("epoch", "step") and not k.startswith("spectral_norm/")}
    accs = [h.get("val_acc", math.nan) for h in history if isinstance(h.get("val_acc"), float)]
    finite = [a for a in accs if math.isfinite(a)]
    times = [h["step_time_ms"] for h in history if "step_time_ms" in h]
    return {**finals, "epochs": last.get("epoch"), "best_val_acc": max(finite) if finite else math.nan,
            "mean_step_time_ms": sum(times) / len(times) if times else math.nan,
            "total_time_s": sum(h.get("time", 0.0) for h in history)}


def _routing(trainer: Any, model: Any, directory: Path) -> str | None:
    """The table of which rule updated which parameter, from the fit's optimizer (else the
    ``routing.md`` the module wrote at fit start)."""
    from lightning_spectral.optim import routing_table

    if trainer.optimizers:
        return routing_table(trainer.optimizers[0], getattr(model, "net", model))
    found = sorted(directory.glob("tensorboard/*/routing.md"))
    return found[-1].read_text().strip() if found else None


def _set_old_logs_aside(logs: Path, log: Callable[[str], None]) -> None:
    """A run that starts from scratch (a changed config, a forced rerun, a stop before its first
    checkpoint) moves the TensorBoard log of the earlier attempt aside, beside the checkpoints
    moved aside, so that ``version_0`` holds this run's events only; a resumed run appends to it."""
    if logs.is_dir() and any(logs.iterdir()):
        target = _aside_name(logs, "stale")
        os.replace(logs, target)
        log(f"  the TensorBoard log in {logs} is from an earlier attempt of this run; the run restarts with a new "
            f"one (old one in {target})")


class RunConfigError(ValueError):
    """A run's resolved config that the Lightning CLI refuses (an unknown or ill-typed argument)."""


def execute_train(study: Study, run: Run, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit one run through :func:`~lightning_spectral.spectral_cli.build_cli` (``run=False``) and write ``result.json``.

    The run directory is locked for the fit (:func:`~lightning_spectral.checkpoint.run_lock`: a
    second process on the same run fails at once). The fit resumes from the checkpoint that
    :func:`~lightning_spectral.checkpoint.resume_checkpoint` picks: one written for this very
    config that loads; checkpoints of another config, and files that do not load, are moved aside.
    """
    directory = run_dir(study, run, out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    config = full_config(study, run, out_dir)
    digest = config_hash(config)
    with run_lock(directory):
        (directory / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        previous = directory / "result.json"
        if previous.exists():  # stale result of another config
            previous.unlink()
        resume = resume_checkpoint(directory / "checkpoints", digest, log)
        if resume is None:
            _set_old_logs_aside(directory / "tensorboard", log)
        write_config_marker(directory / "checkpoints", digest)
        try:
            cli = build_cli(["--config", str(directory / "run.yaml")], run=False,
                            save_config_kwargs={"overwrite": True})
        except SystemExit as exit_:  # the parser printed why and exits: one run's bad config, not the study's end
            raise RunConfigError(f"run {run.run_id}: its config does not parse (the parser's message is printed above; "
                                 f"exit status {exit_.code}); fix the study file's settings for this run, see "
                                 f"{directory / 'run.yaml'}") from None
        recorder = next(c for c in cli.trainer.callbacks if isinstance(c, EpochRecorder))
        # the HParams entry of `fit`, with the run's axis labels (added here, not to run.yaml: the config hash stays)
        add_hparams_summary(cli.trainer, run.config.get("data"), {f"axis/{k}": v for k, v in run.axes.items()})
        status, error = "finished", None
        start = time.perf_counter()
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume) if resume else None)
        except FloatingPointError as err:  # a NaN/Inf loss, gradient or step stopped the run
            status, error = "diverged", str(err)
        if recorder.diverged:
            status = "diverged"
        result = {
            "study": study.name, "run_id": run.run_id, "axes": run.axes, "values": run.values, "seed": run.seed,
            "status": status, "error": error, "config_hash": digest,
            "resolved_config_hash": resolved_config_hash(study, run), "provenance": provenance(),
            "wall_time_s": time.perf_counter() - start, "resumed_from": str(resume) if resume else None,
            "routing": _routing(cli.trainer, cli.model, directory),
            **_summary(recorder.history),
            **{f"final_{k}" if not k.startswith("final") else k: v for k, v in recorder.final.items()},
            "history": recorder.history,
        }
        with interrupt.deferred():  # the result and the removal of the checkpoints go together
            if not diagnostics(study)["keep_checkpoints"]:
                shutil.rmtree(directory / "checkpoints", ignore_errors=True)
            write_json(previous, result)
    return result


def execute_lr_scan(study: Study, run: Run, out_dir: str | Path) -> dict[str, Any]:
    """One :func:`lr_stability_scan` of the run's model and optimizer on the training data."""
    import torch
    import torch.nn.functional as F

    from lightning_spectral.diagnostics.lr_scan import lr_stability_scan
    from lightning_spectral.experiments.build import build_data, build_net, build_optimizer
    from lightning_spectral.optim import routing_table

    directory = run_dir(study, run, out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.yaml").write_text(yaml.safe_dump({"config": run.config, "scan": study.scan}, sort_keys=False))
    data = build_data(run.config)
    scan = dict(study.scan)
    lr_range = tuple(scan.pop("lr_range", (1e-3, 2.0)))
    device = scan.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    out = lr_stability_scan(
        lambda: build_net(run.config, data),
        lambda model, lr: build_optimizer(run.config, model, lr),
        lambda model, x, y: F.cross_entropy(model(x), y),
        data.train_dataloader(), lr_range=lr_range, device=device, seed=run.seed, **scan,
    )
    net = build_net(run.config, data)
    result = {"study": study.name, "run_id": run.run_id, "axes": run.axes, "values": run.values, "seed": run.seed,
              "status": "finished", "config_hash": run_hash(study, run, out_dir),
              "resolved_config_hash": resolved_config_hash(study, run), "provenance": provenance(),
              "routing": routing_table(build_optimizer(run.config, net, lr_range[0]), net),
              "wall_time_s": time.perf_counter() - start, **out}
    write_json(directory / "result.json", result)
    return result


def execute(study: Study, run: Run, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    if study.kind == "lr_scan":
        return execute_lr_scan(study, run, out_dir)
    return execute_train(study, run, out_dir, log)


def run_study(study: Study, out_dir: str | Path, only: list[str] | None = None, force: bool = False,
              log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Run every pending run (or the ``only`` ids) in this process, one after the other.

    A run that raises is reported and the others go on; its directory keeps no ``result.json``,
    so the next invocation retries it. Returns ``{"ran", "skipped", "failed"}`` run ids.
    SIGTERM or SIGINT stops the run in progress (SIGTERM at its next batch) and raises
    :class:`~lightning_spectral.experiments.interrupt.StudyInterrupted` naming it and the runs not started.
    """
    runs = expand(study)
    if only:
        unknown = set(only) - {r.run_id for r in runs}
        if unknown:
            raise SystemExit(f"error: unknown run id(s) {sorted(unknown)}; list them with --print_runs")
        runs = [r for r in runs if r.run_id in only]
    done: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": []}
    current: list[str] = []
    try:
        with interrupt.stop_on_signals():
            for i, run in enumerate(runs, 1):
                current = [run.run_id]
                _run_one(study, run, out_dir, force, f"[{study.name} {i}/{len(runs)}]", done, log)
                current = []
                interrupt.check()
    except (interrupt.StudyInterrupted, SIGTERMException) as err:
        signum = err.signum if isinstance(err, interrupt.StudyInterrupted) else signal.SIGTERM
        finished = set(done["ran"] + done["skipped"] + done["failed"] + current)
        raise interrupt.StudyInterrupted(signum, current, [r.run_id for r in runs if r.run_id not in finished]) from None
    return done


def _run_one(study: Study, run: Run, out_dir: str | Path, force: bool, tag: str, done: dict[str, list[str]],
             log: Callable[[str], None]) -> None:
    """One run of :func:`run_study`, unless it is finished: its id goes to ``done["ran"]``,
    ``["skipped"]`` or ``["failed"]`` (its traceback in ``error.txt``)."""
    directory = run_dir(study, run, out_dir)
    if not force and is_finished(directory, run_hash(study, run, out_dir)):
        done["skipped"].append(run.run_id)
        return
    log(f"{tag} {run.run_id}")
    try:
        result = execute(study, run, out_dir, log)
    except Exception as err:  # noqa: BLE001 - keep the grid going; the run stays pending
        from lightning_spectral.data import DatasetUnavailableError

        if isinstance(err, DatasetUnavailableError):
            raise
        log(f"  FAILED: {type(err).__name__}: {err}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(traceback.format_exc())
        done["failed"].append(run.run_id)
        return
    done["ran"].append(run.run_id)
    acc = result.get("final_val_acc", result.get("max_stable_lr"))
    log(f"  {result['status']}: {acc if acc is None else f'{acc:.4g}'} in {result['wall_time_s']:.1f}s")


def run_commands(study: Study, study_args: list[str], out_dir: str | Path, include_finished: bool = False) -> list[str]:
    """One shell command per (pending) run: ``python -m lightning_spectral study <study_args> --run <id>``."""
    runs = expand(study) if include_finished else pending_runs(study, out_dir)
    prefix = " ".join(shlex.quote(a) for a in ["python", "-m", "lightning_spectral", "study", *study_args])
    return [f"{prefix} --run {shlex.quote(r.run_id)}" for r in runs]
