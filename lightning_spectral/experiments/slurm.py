"""``study --slurm``: a SLURM array job over a study's pending runs, from the same study file.

Writes under ``<out_dir>/<study>/slurm/``:

* ``runs.txt``: the pending run ids, one a line; array task ``K`` runs line ``K``.
* ``array.sbatch``: ``#SBATCH --array=1-K`` with the resources given, the working directory,
  one log per task (``logs/%A_%a.out``), ``--requeue``, and ``--signal=B:USR1@<s>``: shortly
  before the time limit the batch shell gets USR1, sends SIGTERM to the run (which stops at the
  next batch, keeping its last per-epoch checkpoint) and requeues the task, which resumes from
  that checkpoint (exit 143 when ``scontrol requeue`` fails). Each task is the single-run command
  ``python -m lightning_spectral study <args> --run <id> --no_collect``.
* ``prepare.sh``: the data downloaded once (``study --prepare_data``) under ``flock``, to run
  (or submit) before the array, so that the tasks do not download into one directory at once.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    env: str | None = None  # e.g. "source .venv/bin/activate"
    signal_s: int = 120  # seconds before the time limit the task is told to stop and requeue


def _resources(opts: SlurmOptions, gpus: bool) -> list[str]:
    lines = [f"#SBATCH --partition={opts.partition}" if opts.partition else "",
             f"#SBATCH --time={opts.time}" if opts.time else "",
             f"#SBATCH --cpus-per-task={opts.cpus_per_task}" if opts.cpus_per_task else "",
             f"#SBATCH --mem={opts.mem}" if opts.mem else "",
             f"#SBATCH --gpus-per-task={opts.gpus_per_task}" if gpus and opts.gpus_per_task else ""]
    return [line for line in lines if line]


def _command(study_args: Sequence[str], extra: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "lightning_spectral", "study", *study_args, *extra])


def write_slurm(name: str, run_ids: Sequence[str], study_args: Sequence[str], directory: str | Path,
                opts: SlurmOptions, workdir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``runs.txt``, ``array.sbatch`` and ``prepare.sh`` into ``directory``; returns the
    paths of the two scripts. ``study_args`` are the options each task repeats (``--config`` ...)."""
    if not run_ids:
        raise ValueError("no pending runs: nothing to submit (use --force to re-run finished ones)")
    directory = Path(directory).resolve()
    workdir = Path(workdir or os.getcwd()).resolve()
    (directory / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    runs_file = directory / "runs.txt"
    runs_file.write_text("".join(f"{r}\n" for r in run_ids))
    threads = [] if any(a.split("=", 1)[0] == "--threads" for a in study_args) else ["--threads", "${SLURM_CPUS_PER_TASK:-1}"]
    task = _command(study_args, ["--no_collect"]) + " " + " ".join(threads) + ' --run "$RUN_ID"'
    env = opts.env or "# (no environment activation given: --env 'source .venv/bin/activate')"
    q = shlex.quote
    sbatch = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=1-{len(run_ids)}",
        "#SBATCH --ntasks=1",
        *_resources(opts, gpus=True),
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={directory}/logs/%A_%a.out",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{opts.signal_s}",
        "set -uo pipefail",
        f"cd {q(str(workdir))}",
        env,
        f'RUN_ID=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" {q(str(runs_file))})',
        'if [ -z "$RUN_ID" ]; then echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 1; fi',
        'echo "task ${SLURM_ARRAY_TASK_ID}: run $RUN_ID on $(hostname)"',
        "# Near the time limit: stop the run (SIGTERM: it keeps its last checkpoint) and requeue the task.",
        "trap 'kill -TERM \"$child\" 2>/dev/null; wait \"$child\"; "
        "scontrol requeue \"${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID}\" && exit 0; "
        "echo \"requeue failed: submit this task again to resume $RUN_ID\" >&2; exit 143' USR1",
        f"{task} &",
        "child=$!",
        'wait "$child"',
        "exit $?",
        "",
    ])
    prepare = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={name}-prepare",
        "#SBATCH --ntasks=1",
        *_resources(opts, gpus=False),
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={directory}/logs/prepare_%j.out",
        "set -euo pipefail",
        f"cd {q(str(workdir))}",
        env,
        "# The data downloaded once; the lock keeps two copies of this script from downloading at once.",
        f"exec 9>{q(str(directory / 'prepare.lock'))}",
        "flock 9",
        _command(study_args, ["--prepare_data"]),
        "",
    ])
    paths = directory / "array.sbatch", directory / "prepare.sh"
    for path, text in zip(paths, (sbatch, prepare)):
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return paths


def submit_hint(array: Path, prepare: Path, collect_command: str) -> str:
    """How to submit the scripts (the data first), where the logs go, and how to collect afterwards."""
    return (f"submit:  jid=$(sbatch --parsable {prepare}) && sbatch --dependency=afterok:$jid {array}\n"
            f"or:      bash {prepare} && sbatch {array}\n"
            f"per-task logs: {array.parent / 'logs'}/<job>_<task>.out\n"
            f"afterwards: {collect_command}")
