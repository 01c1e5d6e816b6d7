"""Studies fed bad or hostile input: each row a clear error naming the field, the value and the
rule, or the right behaviour. A study file is untrusted (colleagues share them): nothing in it
may write outside ``--out_dir`` or put a line of its own into a generated script."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from lightning_spectral.experiments.cli import study_main
from lightning_spectral.experiments.files import OutsideOutputError, inside
from lightning_spectral.experiments.report import collect
from lightning_spectral.experiments.runner import run_dir
from lightning_spectral.experiments.slurm import SlurmOptions, SlurmScriptError, write_slurm
from lightning_spectral.experiments.spec import Run, Study, StudySpecError, expand, load_study

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@dataclass
class Row:
    """``run(ctx)`` raises ``error`` with every string of ``names`` in its message, or
    (``error=None``) asserts the right behaviour itself."""

    id: str
    run: Callable[[Any], Any]
    error: type[BaseException] | None = None
    names: tuple[str, ...] = field(default_factory=tuple)


class CLIError(Exception):
    """``study``'s exit status and error output, for a row."""


class Context:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.out = tmp / "a" / "b" / "c" / "out"  # deep, so that '../../../x' would still land inside tmp

    def study(self, **study) -> Path:
        """A study file: the quick start's config, one SGD variant, seed 0, unless overridden."""
        spec = {"name": "t", "base": str(QUICKSTART), "seeds": [0], "grids": [{"optimizer": [{"name": "SGD"}]}]}
        spec.update(study)
        path = self.tmp / "study.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
        return path

    def files(self) -> set[Path]:
        return {p for p in self.tmp.rglob("*")}

    def cli(self, *args: str) -> None:
        """Run ``study`` on the study file; raise :class:`CLIError` with stderr unless it exits 0."""
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = study_main(["--config", str(self.tmp / "study.yaml"), "--out_dir", str(self.out), *args])
        if code:
            raise CLIError(f"exit {code}: {err.getvalue()}")


def sbatch_directives(script: str) -> tuple[list[str], list[str]]:
    """The arguments sbatch takes from a script's ``#SBATCH`` lines, read by sbatch's rules (the
    first line that is neither blank nor a comment ends them; whitespace separates arguments,
    quotes group, a backslash escapes the next character, an unquoted ``#`` starts a comment),
    and every ``#SBATCH`` line of the script (those after the first command are ignored by sbatch)."""
    args, reading = [], True
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.strip().startswith("#"):
                reading = False
            continue
        if not reading:
            continue
        rest, current, quote, escaped, started = line[len("#SBATCH"):], "", None, False, False
        for ch in rest:
            if escaped:
                current, escaped, started = current + ch, False, True
            elif ch == "\\":
                escaped = True
            elif quote:
                if ch == quote:
                    quote = None
                else:
                    current += ch
            elif ch in "\"'":
                quote, started = ch, True
            elif ch == "#":
                break
            elif ch.isspace():
                if started:
                    args.append(current)
                current, started = "", False
            else:
                current, started = current + ch, True
        assert quote is None, f"unmatched quote in {line!r}"
        if started:
            args.append(current)
    return args, [line for line in script.splitlines() if line.startswith("#SBATCH")]


# -- rows ---------------------------------------------------------------------------------------
def _traversal_writes_nothing(ctx: Context) -> None:
    """``name: ../../../x``: exit 2 naming the field, the value and the rule; not a file written."""
    ctx.study(name="../../../x")
    before = ctx.files()
    with pytest.raises(CLIError) as info:
        ctx.cli("--max_epochs", "1")
    assert "exit 2" in str(info.value)
    for name in ("the study name", "'../../../x'", "not a safe name", "no path separators"):
        assert name in str(info.value)
    assert ctx.files() == before


def _newline_name_writes_no_script(ctx: Context) -> None:
    ctx.study(name="x\necho pwned\n#SBATCH --partition=other")
    before = ctx.files()
    with pytest.raises(CLIError) as info:
        ctx.cli("--slurm", "--partition", "gpu")
    assert "the study name" in str(info.value) and "control characters" in str(info.value)
    assert ctx.files() == before


def _code_built_study(name: str) -> Study:
    return Study(name=name, kind="train", path=None, base={}, seeds=[0], grids=[{}])


def _every_writer_refuses_a_bad_name(ctx: Context) -> None:
    """A Study built in code, past load_study: the run directory, the report and the SLURM
    scripts all refuse its name before writing anything."""
    before = ctx.files()
    for name in ("../x", "x/../../y", "x\ny", "-x", ".x", ""):
        study = _code_built_study(name)
        with pytest.raises(StudySpecError, match="not a safe name"):
            run_dir(study, Run("seed=0", {}, {}, 0, {}), ctx.out)
        with pytest.raises(StudySpecError, match="not a safe name"):
            collect(study, ctx.out)
        with pytest.raises(StudySpecError, match="not a safe name"):
            write_slurm(name, ["seed=0"], [], ctx.out / "slurm", SlurmOptions())
    with pytest.raises(StudySpecError, match="the run id '../y' is not a safe name"):
        run_dir(_code_built_study("t"), Run("../y", {}, {}, 0, {}), ctx.out)
    assert ctx.files() == before


def _inside(ctx: Context) -> None:
    assert inside(ctx.out, "t", "runs", "r") == ctx.out / "t" / "runs" / "r"
    assert inside(ctx.out, "t", "..", "u") == ctx.out / "t" / ".." / "u"  # still under out
    for parts in (("..", "x"), ("t", "..", "..", "x"), ("/etc/passwd",), (str(ctx.tmp),)):
        with pytest.raises(OutsideOutputError, match="would lie outside"):
            inside(ctx.out, *parts)
    with pytest.raises(OutsideOutputError, match="would lie outside"):  # a prefix is not a parent
        inside(ctx.out, str(ctx.out) + "-sibling")


def _sbatch_values_quoted(ctx: Context) -> None:
    """Values with spaces, quotes, '#', '\\' and '%' reach sbatch exactly, all directives come
    before the first command, and the shell lines quote the paths."""
    import shlex

    workdir = ctx.tmp / 'work dir #1 "q" \\ end'
    directory = ctx.tmp / "slurm 100%"
    workdir.mkdir()
    array, prepare = write_slurm("t", ["optimizer=SGD__seed=0"], ["--config", "my study.yaml"], directory,
                                 SlurmOptions(partition="gpu #a", mem="4G", time="01:00:00"), workdir=workdir)
    for script in (array, prepare):
        text = script.read_text()
        args, lines = sbatch_directives(text)
        assert len(args) == len(lines)  # every #SBATCH line is read: none after a command
        assert f"--chdir={workdir}" in args and "--partition=gpu #a" in args and "--mem=4G" in args
        assert f"--output={str(directory).replace('%', '%%')}/logs/" + ("%A_%a.out" if script == array
                                                                          else "prepare_%j.out") in args
        assert f"cd {shlex.quote(str(workdir))}" in text.splitlines()
    args, _ = sbatch_directives(array.read_text())
    assert {"--array=1-1", "--job-name=t", "--requeue", "--ntasks=1"} <= set(args)
    task = next(line for line in array.read_text().splitlines() if "--no_collect" in line)
    assert shlex.split(task)[:6] == ["python", "-m", "lightning_spectral", "study", "--config", "my study.yaml"]


def _sbatch_control_character(ctx: Context) -> None:
    ctx.study()
    before = ctx.files()
    try:
        ctx.cli("--slurm", "--partition", "gpu\n#SBATCH --account=other")
    finally:
        assert not (ctx.out / "t" / "slurm" / "array.sbatch").exists()
        assert {p for p in ctx.files() - before if p.is_file()} <= {ctx.out / "t" / "slurm" / "runs.txt"}


def _run_id_with_a_leading_dash(ctx: Context) -> None:
    load_study(ctx.study(grids=[{"-lr": {"key": "model.init_args.optimizer.init_args.lr", "values": [0.1]}}]))


def _grids_null(ctx: Context) -> None:
    path = ctx.study(grids=None)
    path.write_text(path.read_text() + "grids:\n")  # the key with nothing under it
    load_study(path)


def _tensorboard_log_of_a_changed_config(ctx: Context) -> None:
    """A finished run whose config then changes: the rerun's ``version_0`` holds its own events
    only (one validation point, the new result's loss); the old log is kept aside. A resumed run
    (same config, from its checkpoint) appends to its log instead."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(log: Path) -> list[float]:
        events = EventAccumulator(str(log / "version_0"))
        events.Reload()
        return [e.value for e in events.Scalars("val/loss")]

    base = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 0.05,
            "trainer.accelerator": "cpu", "data.init_args.batch_size": 16}
    diagnostics = {"sharpness": False, "noise_scale": False, "constraint": False, "spectral": False,
                   "keep_checkpoints": True}
    run = ctx.out / "t" / "runs" / "optimizer=SGD__seed=0"
    results = []
    for lr in (0.05, 0.01):
        ctx.study(set=base, diagnostics=diagnostics, grids=[{"optimizer": [{"name": "SGD", "set": {
            "model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": lr}}}}]}])
        ctx.cli("--no_collect")
        results.append(json.loads((run / "result.json").read_text()))
    stale = sorted(run.glob("tensorboard.stale-*"))
    assert len(stale) == 1 and len(sorted(run.glob("checkpoints.stale-*"))) == 1
    assert losses(run / "tensorboard") == pytest.approx([results[1]["final_val_loss"]])
    assert losses(stale[0]) == pytest.approx([results[0]["final_val_loss"]])
    (run / "result.json").unlink()  # interrupted after its last checkpoint: resumes, appends, sets nothing aside
    ctx.cli("--no_collect")
    assert json.loads((run / "result.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert sorted(run.glob("tensorboard.stale-*")) == stale


ROWS = [
    Row("name-traversal-writes-nothing", _traversal_writes_nothing),
    Row("name-newline-writes-no-script", _newline_name_writes_no_script),
    Row("name-every-writer-refuses", _every_writer_refuses_a_bad_name),
    Row("name-separator", lambda c: load_study(c.study(name="a/b")), StudySpecError,
        ("the study name 'a/b' is not a safe name", "no path separators")),
    Row("name-backslash", lambda c: load_study(c.study(name="a\\b")), StudySpecError, ("'a\\\\b'", "not a safe name")),
    Row("name-dotdot-inside", lambda c: load_study(c.study(name="a..b")), StudySpecError, ("'a..b'", "no '..'")),
    Row("name-leading-dot", lambda c: load_study(c.study(name=".hidden")), StudySpecError,
        ("'.hidden'", "no leading '.' or '-'")),
    Row("name-leading-dash", lambda c: load_study(c.study(name="--force")), StudySpecError,
        ("'--force'", "no leading '.' or '-'")),
    Row("name-space", lambda c: load_study(c.study(name="my study")), StudySpecError, ("'my study'", "no spaces")),
    Row("name-tab", lambda c: load_study(c.study(name="a\tb")), StudySpecError, ("'a\\tb'", "control characters")),
    Row("name-empty", lambda c: load_study(c.study(name="")), StudySpecError, ("the study name ''",)),
    Row("name-too-long", lambda c: load_study(c.study(name="x" * 201)), StudySpecError, ("at most 200",)),
    Row("name-from-a-dashed-file-stem", lambda c: load_study(
        c.study(name=None).rename(c.tmp / "-x.yaml")), StudySpecError, ("the file's stem", "give the study a name")),
    Row("name-number-is-a-name", lambda c: assert_equal(load_study(c.study(name=2024)).name, "2024")),
    Row("name-through-set-override", lambda c: load_study(c.study(), {"name": "../x"}), StudySpecError,
        ("the study name '../x'",)),
    Row("run-id-leading-dash", _run_id_with_a_leading_dash, StudySpecError,
        ("the run id '-lr=0.1__seed=0' is not a safe name", "rename the first axis")),
    Row("label-newline", lambda c: load_study(c.study(grids=[{"optimizer": [{"name": "SGD\nx"}]}])),
        StudySpecError, ("axis 'optimizer': the label 'SGD\\nx'", "'\\n'", "one line of visible text")),
    Row("label-bidi-override", lambda c: load_study(c.study(grids=[{"optimizer": [{"name": "a\u202eb"}]}])),
        StudySpecError, ("'\\u202e'",)),
    Row("label-blank", lambda c: load_study(c.study(grids=[{"optimizer": [{"name": "  "}]}])), StudySpecError,
        ("no visible character",)),
    Row("axis-name-newline", lambda c: load_study(c.study(grids=[{"opt\nx": [{"name": "SGD"}]}])), StudySpecError,
        ("the axis name 'opt\\nx'",)),
    Row("value-label-newline", lambda c: load_study(c.study(grids=[{"note": {"key": "x", "values": ["a\nb"]}}])),
        StudySpecError, ("the label 'a\\nb'",)),
    Row("grids-empty", lambda c: load_study(c.study(grids=[])), StudySpecError,
        ("grids is empty, so the study has no runs", "leave grids out")),
    Row("grids-null", _grids_null, StudySpecError, ("grids is empty",)),
    Row("grids-left-out-is-one-run-per-seed", lambda c: assert_equal(
        [r.run_id for r in expand(load_study(c.study(grids=None, seeds=[0, 1])))], ["seed=0", "seed=1"])),
    Row("seeds-repeated", lambda c: load_study(c.study(seeds=[0, 1, 0])), StudySpecError,
        ("seeds [0, 1, 0] list 0 more than once", "list each seed once")),
    Row("grid-seeds-repeated", lambda c: load_study(c.study(grids=[{"axes": {"optimizer": [{"name": "SGD"}]},
                                                                    "seeds": [3, 3]}])), StudySpecError,
        ("grid 0: seeds [3, 3] list 3 more than once",)),
    Row("seeds-repeated-on-the-command-line", lambda c: (c.study(), c.cli("--seeds", "1,1", "--print_runs")),
        CLIError, ("exit 2", "seeds [1, 1] list 1 more than once")),
    Row("tensorboard-log-of-a-changed-config-set-aside", _tensorboard_log_of_a_changed_config),
    Row("path-inside", _inside),
    Row("sbatch-values-quoted", _sbatch_values_quoted),
    Row("sbatch-control-character", _sbatch_control_character, CLIError,
        ("exit 2", "--partition", "the control character '\\n'")),
    Row("sbatch-control-character-api", lambda c: write_slurm("t", ["seed=0"], [], c.tmp, SlurmOptions(mem="4G\n")),
        SlurmScriptError, ("--mem '4G\\n'",)),
]


def assert_equal(a: Any, b: Any) -> None:
    assert a == b, (a, b)


def test_rows_have_distinct_ids() -> None:
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_study_input(row: Row, tmp_path: Path) -> None:
    ctx = Context(tmp_path)
    if row.error is None:
        row.run(ctx)
        return
    with pytest.raises(row.error) as info:
        row.run(ctx)
    for name in row.names:
        assert name in str(info.value), (row.id, str(info.value))
