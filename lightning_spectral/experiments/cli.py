"""``python -m lightning_spectral study --config configs/studies/<name>.yaml [options]``.

Runs the study's pending runs one after the other in this process (``--jobs N``: N at once, each
in its own process), then collects the report and prints its summary table. SIGTERM or SIGINT
(Ctrl-C) stops every run it started, each keeping its last end-of-epoch checkpoint, and exits
143 / 130 naming the runs that the same command resumes.

    --print_runs        print one shell command per pending run (``--all``: every run) and exit;
                        each is ``... study --config X [same options] --run <id>``, for a scheduler
                        (for SLURM, --slurm writes the whole array script)
    --run ID            run only this run (repeatable); finished runs are skipped unless --force
    --check             tell which pages under --docs (default docs/results) no longer match the code
                        or config that would produce them (exit 1 when one is stale, listing why);
                        --config may then be a folder of study files
    --collect           only aggregate the finished runs (after the array jobs)
    --no_collect        run without aggregating
    --out_dir DIR       where runs go (default logs/studies); the study's runs are under DIR/<name>/
    --report_dir DIR    where the report goes (default DIR/<name>/report)
    --docs DIR          also write <DIR>/<name>.md and its PNGs under <DIR>/figures/
    --seeds 0,1,2       replace the study's seeds
    --max_epochs N      replace trainer.max_epochs of every run
    --threads N         torch.set_num_threads(N) (with --jobs: per process; default cores // N)
    --jobs N            run N runs at once, each a separate process (``... --run <id>``) with its
                        stdout/stderr in runs/<id>/log.txt, its share of the threads and, where CUDA
                        devices exist, one device of its own (CUDA_VISIBLE_DEVICES round robin); a
                        progress line on stderr (done / running / failed / pending, elapsed, ETA);
                        exit 1 if a run failed
    --prepare_data      only download / prepare the data of every run (each data module's prepare_data) and exit
    --slurm             write <out_dir>/<name>/slurm/array.sbatch (an array over the pending runs: resources,
                        working directory, per-task logs, --requeue, USR1 before the time limit stops
                        the run resumably and requeues it) and prepare.sh (the data once, under flock)
                        and print how to submit them; resources:
                        --partition P --time HH:MM:SS --gpus-per-task G --cpus-per-task C --mem M
                        --env 'source .venv/bin/activate' (the environment activation line)
    --set KEY=VALUE     any dotted override of the study file, VALUE in YAML (``--set set.data.init_args.batch_size=32``)
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import yaml

from lightning_spectral.experiments import interrupt
from lightning_spectral.experiments.report import collect, group_results, load_results
from lightning_spectral.experiments.report.summary import summary_section
from lightning_spectral.experiments.runner import pending_runs, run_commands, run_dir, run_study, study_dir
from lightning_spectral.experiments.spec import StudySpecError, expand, load_study
from lightning_spectral.parser_errors import did_you_mean

PASS_THROUGH = ("--out_dir", "--seeds", "--max_epochs", "--set", "--threads")
COMMAND = ["python", "-m", "lightning_spectral", "study"]


class _Parser(argparse.ArgumentParser):
    """Options are never abbreviated (``--out`` for ``--out_dir`` would be read here but not repeated in
    the per-run commands of ``--print_runs`` and ``--jobs``, which pass the options on by their full
    names); an unknown option gets the closest ones."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for o in self._option_string_actions if o.startswith("--")]
            for given in (a.split("=", 1)[0] for a in unknown.group(1).split() if a.startswith("--")):
                message += f"\nunknown option {given}" + did_you_mean(given, options)
        super().error(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lightning_spectral study",
        description="Run a study (a grid of Lightning runs) from configs/studies/<name>.yaml, resumably, and collect "
                    "its tables and figures.", epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="the study file")
    p.add_argument("--run", action="append", default=[], metavar="ID", help="run only this run id (repeatable)")
    p.add_argument("--print_runs", action="store_true", help="print one command per pending run and exit")
    p.add_argument("--all", action="store_true", help="with --print_runs: also the finished runs")
    p.add_argument("--check", action="store_true",
                   help="list the pages under --docs (default docs/results) that are stale; exit 1 if any")
    p.add_argument("--collect", action="store_true", help="only aggregate finished runs")
    p.add_argument("--no_collect", action="store_true", help="do not aggregate after running")
    p.add_argument("--force", action="store_true", help="re-run finished runs")
    p.add_argument("--out_dir", default="logs/studies")
    p.add_argument("--report_dir", default=None)
    p.add_argument("--docs", default=None, metavar="DIR")
    p.add_argument("--seeds", default=None, help="comma-separated seeds replacing the study's")
    p.add_argument("--max_epochs", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 is much faster for these small CPU runs on a busy machine); "
                        "with --jobs N: per process, default max(1, cores // N)")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N", help="run N runs at once, one process each")
    p.add_argument("--prepare_data", action="store_true", help="only prepare (download) the data of the runs")
    p.add_argument("--slurm", action="store_true", help="write a SLURM array script over the pending runs and exit")
    p.add_argument("--partition", default=None, help="--slurm: the partition")
    p.add_argument("--time", default=None, metavar="HH:MM:SS", help="--slurm: the time limit of each task")
    p.add_argument("--gpus-per-task", "--gpus_per_task", type=int, default=None, dest="gpus_per_task",
                   help="--slurm: GPUs per task")
    p.add_argument("--cpus-per-task", "--cpus_per_task", type=int, default=None, dest="cpus_per_task",
                   help="--slurm: CPUs per task (each run's --threads, unless --threads is given)")
    p.add_argument("--mem", default=None, help="--slurm: memory per task (e.g. 16G)")
    p.add_argument("--env", default=None, metavar="LINE",
                   help="--slurm: the environment activation line (e.g. 'source .venv/bin/activate')")
    return p


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    if args.seeds is not None:
        out["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.max_epochs is not None:
        out["set.trainer.max_epochs"] = args.max_epochs
    return out


def _pass_through(argv: Sequence[str]) -> list[str]:
    """The options a per-run command must repeat (config, out_dir, seeds, max_epochs, set)."""
    out, i, argv = [], 0, list(argv)
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in ("--config", "-c", *PASS_THROUGH):
            if "=" in a:
                out.append(a)
            elif i + 1 < len(argv):
                out += [a, argv[i + 1]]
                i += 1
        i += 1
    return out


def _exclude(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value (``--x V`` or ``--x=V``)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def print_summary(study: Any, out_dir: str) -> None:
    """The report's summary table (mean ± std over seeds) on stdout."""
    if study.kind != "lr_scan":
        print(summary_section(group_results(load_results(study, out_dir)), study.report.get("summary", {})))


def prepare_data_main(study: Any) -> int:
    """``--prepare_data``: each distinct data module of the study's runs, ``prepare_data()`` once."""
    from lightning.pytorch import LightningDataModule

    from lightning_spectral.experiments.build import instantiate

    seen: set[str] = set()
    for run in expand(study):
        key = yaml.safe_dump(run.config.get("data"), sort_keys=True)
        if key in seen or not run.config.get("data"):
            continue
        seen.add(key)
        data = instantiate(run.config["data"], kind=LightningDataModule)
        print(f"prepare_data: {type(data).__name__}", flush=True)
        data.prepare_data()
    return 0


def slurm_main(study: Any, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--slurm``: write the array script and the data preparation script; print how to submit."""
    from lightning_spectral.experiments.slurm import SlurmOptions, SlurmScriptError, submit_hint, write_slurm

    if args.force:
        print("error: --slurm covers the pending runs; to re-run a finished one, delete its result.json",
              file=sys.stderr)
        return 2
    runs = [r for r in pending_runs(study, args.out_dir) if not args.run or r.run_id in args.run]
    study_args = _pass_through(argv)
    if not runs:
        print(f"{study.name}: no pending runs; nothing to submit", file=sys.stderr)
        return 0
    opts = SlurmOptions(partition=args.partition, time=args.time, gpus_per_task=args.gpus_per_task,
                        cpus_per_task=args.cpus_per_task, mem=args.mem, env=args.env)
    try:
        array, prepare = write_slurm(study.name, [r.run_id for r in runs], study_args,
                                     study_dir(study, args.out_dir) / "slurm", opts)
    except (SlurmScriptError, StudySpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    collect_command = " ".join(shlex.quote(a) for a in [*COMMAND, *_pass_through(argv), "--collect"])
    print(f"wrote {array} ({len(runs)} array tasks) and {prepare}")
    print(submit_hint(array, prepare, collect_command))
    return 0


def run_jobs(study: Any, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, list[str]]:
    """``--jobs N``: the pending runs (or the ``--run`` ids) N at a time, each in its own process."""
    from lightning_spectral.experiments.parallel import run_parallel

    runs = expand(study)
    if args.run:
        unknown = set(args.run) - {r.run_id for r in runs}
        if unknown:
            raise SystemExit(f"error: unknown run id(s) {sorted(unknown)}; list them with --print_runs")
        runs = [r for r in runs if r.run_id in args.run]
    pending = {r.run_id for r in pending_runs(study, args.out_dir)}
    todo = [r for r in runs if args.force or r.run_id in pending]
    command = [sys.executable, *COMMAND[1:], *_exclude(_pass_through(argv), "--threads"), "--no_collect",
               *(["--force"] if args.force else [])]
    done = run_parallel(study.name, [r.run_id for r in todo], {r.run_id: run_dir(study, r, args.out_dir) for r in todo},
                        command, args.jobs, threads=args.threads)
    done["skipped"] = [r.run_id for r in runs if not args.force and r.run_id not in pending]
    return done


def check_main(args: argparse.Namespace) -> int:
    """``--check``: each study file's page under ``--docs``; 0 when every page found is current."""
    from lightning_spectral.experiments.check import stale_reasons

    config = Path(args.config)
    files = sorted(config.rglob("*.yaml")) if config.is_dir() else [config]
    docs = Path(args.docs or "docs/results")
    stale = 0
    for path in files:
        try:
            study = load_study(path, overrides(args))
        except (yaml.YAMLError, StudySpecError, FileNotFoundError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            return 2
        page = docs / f"{study.name}.md"
        reasons = stale_reasons(study, page)
        if reasons is None:
            print(f"{path}: no page {page}")
        elif reasons:
            stale += 1
            print("stale: " + "\n  ".join([str(page), *(r.split(": ", 1)[1] for r in reasons)]))
        else:
            print(f"current: {page}")
    print(f"{stale} stale page(s)" if stale else "every page found is current")
    return 1 if stale else 0


def study_main(argv: Sequence[str] | None = None) -> int:
    """Run the ``study`` command; returns the exit status: 0, 1 when a run failed, 2 for a bad
    study file (its path and the problem on stderr), 143 / 130 after SIGTERM / SIGINT (every run
    process stopped and reaped first; the runs to resume on stderr)."""
    argv = list(sys.argv[2:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        with interrupt.stop_on_signals():
            return _study(args, argv)
    except interrupt.StudyInterrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status


def _study(args: argparse.Namespace, argv: list[str]) -> int:
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.check:
        return check_main(args)
    try:
        study = load_study(args.config, overrides(args))
    except yaml.YAMLError as err:
        print(f"error: {args.config} is not valid YAML: {err}", file=sys.stderr)
        return 2
    except (StudySpecError, FileNotFoundError) as err:  # the message names the file
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.prepare_data:
        return prepare_data_main(study)
    if args.slurm:
        return slurm_main(study, args, argv)
    if args.print_runs:
        commands = run_commands(study, _pass_through(argv), args.out_dir, include_finished=args.all)
        print("\n".join(commands))
        total, pending = len(expand(study)), len(pending_runs(study, args.out_dir))
        print(f"# {study.name}: {total} runs, {pending} pending; afterwards: python -m lightning_spectral study "
              f"{' '.join(shlex.quote(a) for a in _pass_through(argv))} --collect", file=sys.stderr)
        return 0
    failed: list[str] = []
    if not args.collect:
        if args.jobs > 1:
            done = run_jobs(study, args, argv)
        else:
            done = run_study(study, args.out_dir, only=args.run or None, force=args.force)
        failed = done["failed"]
        print(f"{study.name}: ran {len(done['ran'])}, skipped {len(done['skipped'])} finished, failed {len(failed)}")
        if failed:
            print("failed: " + ", ".join(failed), file=sys.stderr)
        if args.run or args.no_collect:
            return 1 if failed else 0
    command = "python -m lightning_spectral study " + " ".join(shlex.quote(a) for a in _pass_through(argv))
    report = collect(study, args.out_dir, args.report_dir, command=command, docs_dir=args.docs)
    print_summary(study, args.out_dir)
    print(f"report: {report / 'summary.md'}")
    return 1 if failed else 0
