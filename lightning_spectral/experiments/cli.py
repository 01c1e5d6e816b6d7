"""``python -m lightning_spectral study --config configs/studies/<name>.yaml [options]``.

Runs the study's pending runs one after the other in this process, then collects the report.

    --print_runs        print one shell command per pending run (``--all``: every run) and exit;
                        each is ``... study --config X [same options] --run <id>``, for a scheduler
                        (SLURM array: ``sed -n "${SLURM_ARRAY_TASK_ID}p" runs.txt | bash``)
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
    --threads N         torch.set_num_threads(N)
    --set KEY=VALUE     any dotted override of the study file, VALUE in YAML (``--set set.data.init_args.batch_size=32``)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from lightning_spectral.experiments.report import collect
from lightning_spectral.experiments.runner import pending_runs, run_commands, run_study
from lightning_spectral.experiments.spec import StudySpecError, expand, load_study

PASS_THROUGH = ("--out_dir", "--seeds", "--max_epochs", "--set", "--threads")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
                   help="torch.set_num_threads (1 is much faster for these small CPU runs on a busy machine)")
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
    study file (its path and the problem on stderr)."""
    argv = list(sys.argv[2:] if argv is None else argv)
    args = parser().parse_args(argv)
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
    if args.print_runs:
        commands = run_commands(study, _pass_through(argv), args.out_dir, include_finished=args.all)
        print("\n".join(commands))
        total, pending = len(expand(study)), len(pending_runs(study, args.out_dir))
        print(f"# {study.name}: {total} runs, {pending} pending; afterwards: python -m lightning_spectral study "
              f"{' '.join(shlex.quote(a) for a in _pass_through(argv))} --collect", file=sys.stderr)
        return 0
    failed: list[str] = []
    if not args.collect:
        done = run_study(study, args.out_dir, only=args.run or None, force=args.force)
        failed = done["failed"]
        print(f"{study.name}: ran {len(done['ran'])}, skipped {len(done['skipped'])} finished, failed {len(failed)}")
        if failed:
            print("failed: " + ", ".join(failed), file=sys.stderr)
        if args.run or args.no_collect:
            return 1 if failed else 0
    command = "python -m lightning_spectral study " + " ".join(shlex.quote(a) for a in _pass_through(argv))
    report = collect(study, args.out_dir, args.report_dir, command=command, docs_dir=args.docs)
    print(f"report: {report / 'summary.md'}")
    return 1 if failed else 0
