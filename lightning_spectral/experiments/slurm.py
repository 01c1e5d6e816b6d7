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

Every value in a script is quoted: for the shell by :func:`shlex.quote`, on ``#SBATCH`` lines by
:func:`sbatch_quote` (sbatch reads those with its own rules); a value with a control character
(a newline would end the directive and start a command) is refused. All directives come before
the first command, where sbatch stops reading them.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lightning_spectral.experiments.spec import check_name

_PLAIN = re.compile(r"[A-Za-z0-9._:/%@+=,-]+")  # needs no quotes on an #SBATCH line


class SlurmScriptError(ValueError):
    """A value that cannot be written into a SLURM script as one directive argument."""


def sbatch_quote(value: Any, option: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line. sbatch splits those at whitespace, groups
    quoted text, takes a backslash as an escape (also inside quotes) and an unquoted ``#`` as the
    start of a comment; so a value that is not plain goes in double quotes with ``\\`` and ``"``
    escaped. A control character cannot be quoted (a newline ends the directive): refused."""
    text = str(value)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None or not text:
        raise SlurmScriptError(f"--{option} {text!r}: " + (f"the control character {bad!r} cannot be written into an "
                                                           "#SBATCH line" if bad is not None else "empty value"))
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def directive(option: str, value: Any = None) -> str:
    """``#SBATCH --option=value`` (or ``#SBATCH --option`` without a value), the value quoted by :func:`sbatch_quote`."""
    return f"#SBATCH --{option}" + ("" if value is None else f"={sbatch_quote(value, option)}")


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
    values = {"partition": opts.partition, "time": opts.time, "cpus-per-task": opts.cpus_per_task, "mem": opts.mem,
              "gpus-per-task": opts.gpus_per_task if gpus else None}
    return [directive(option, value) for option, value in values.items() if value]


def _command(study_args: Sequence[str], extra: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "lightning_spectral", "study", *study_args, *extra])


def write_slurm(name: str, run_ids: Sequence[str], study_args: Sequence[str], directory: str | Path,
                opts: SlurmOptions, workdir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``runs.txt``, ``array.sbatch`` and ``prepare.sh`` into ``directory``; returns the
    paths of the two scripts. ``study_args`` are the options each task repeats (``--config`` ...)."""
    if not run_ids:
        raise ValueError("no pending runs: nothing to submit (use --force to re-run finished ones)")
    name = check_name(name, "the study name")
    run_ids = [check_name(r, "the run id") for r in run_ids]
    directory = Path(directory).resolve()
    workdir = Path(workdir or os.getcwd()).resolve()
    (directory / "logs").mkdir(parents=True, exist_ok=True)  # SLURM does not create the log folder
    runs_file = directory / "runs.txt"
    runs_file.write_text("".join(f"{r}\n" for r in run_ids))
    logs = str(directory / "logs").replace("%", "%%")  # "%" starts a SLURM file-name pattern; "%%" is one "%"
    threads = [] if any(a.split("=", 1)[0] == "--threads" for a in study_args) else ["--threads", "${SLURM_CPUS_PER_TASK:-1}"]
    task = _command(study_args, ["--no_collect"]) + " " + " ".join(threads) + ' --run "$RUN_ID"'
    env = opts.env or "# (no environment activation given: --env 'source .venv/bin/activate')"
    q = shlex.quote
    sbatch = "\n".join([
        "#!/bin/bash",
        directive("job-name", name),
        directive("array", f"1-{len(run_ids)}"),
        directive("ntasks", 1),
        *_resources(opts, gpus=True),
        directive("chdir", workdir),
        directive("output", f"{logs}/%A_%a.out"),
        directive("requeue"),
        directive("signal", f"B:USR1@{int(opts.signal_s)}"),
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
        directive("job-name", f"{name}-prepare"),
        directive("ntasks", 1),
        *_resources(opts, gpus=False),
        directive("chdir", workdir),
        directive("output", f"{logs}/prepare_%j.out"),
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
    q = shlex.quote
    return (f"submit:  jid=$(sbatch --parsable {q(str(prepare))}) && sbatch --dependency=afterok:$jid {q(str(array))}\n"
            f"or:      bash {q(str(prepare))} && sbatch {q(str(array))}\n"
            f"per-task logs: {array.parent / 'logs'}/<job>_<task>.out\n"
            f"afterwards: {collect_command}")
