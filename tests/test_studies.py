"""The study runner: grid expansion, resume, aggregation, print-runs commands, and lr_stability_scan."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lightning_spectral.cli import cli_main
from lightning_spectral.experiments import lr_stability_scan
from lightning_spectral.experiments.cli import study_main
from lightning_spectral.experiments.report import collect, group_results, mean_std
from lightning_spectral.experiments.runner import pending_runs, run_study
from lightning_spectral.experiments.spec import StudySpecError, expand, load_study, set_dotted

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STUDIES = sorted((ROOT / "configs" / "studies").glob("*/*.yaml"))


def write_study(tmp_path: Path, **extra) -> Path:
    study = {
        "name": "tiny",
        "base": str(QUICKSTART),
        "set": {"trainer.max_epochs": 2, "trainer.limit_train_batches": 2, "trainer.limit_val_batches": 1,
                "trainer.accelerator": "cpu", "data.init_args.batch_size": 16},
        "seeds": [0],
        "grids": [{"optimizer": [
            {"name": "SGD", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                                  "init_args": {"lr": 0.05}}}},
            {"name": "MuonSGD", "set": {"model.init_args.optimizer": {
                "class_path": "lightning_spectral.optim.MuonSGD",
                "init_args": {"lr": 0.05, "spectral_budget": 0.1}}}},
        ]}],
        "diagnostics": {"sharpness": False, "noise_scale": False, "constraint": False},
        "report": {"sections": ["metric_grid"]},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# -- grid expansion ---------------------------------------------------------------------------
def test_grid_expansion(tmp_path: Path) -> None:
    path = write_study(tmp_path, seeds=[0, 1], grids=[
        {"optimizer": [{"name": "SGD", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                                              "init_args": {"lr": 0.1}}}}],
         "lr": {"key": "model.init_args.optimizer.init_args.lr", "values": [0.01, 0.3]}},
        {"axes": {"optimizer": [{"name": "AdamW", "set": {"model.init_args.optimizer.class_path": "torch.optim.AdamW"}}]},
         "seeds": [5]},
        {"optimizer": [{"name": "SGD", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                                              "init_args": {"lr": 0.1}}}}],
         "lr": {"key": "model.init_args.optimizer.init_args.lr", "values": [0.01]}},  # the first grid's runs again
    ])
    runs = expand(load_study(path))
    assert [r.run_id for r in runs] == [
        "optimizer=SGD__lr=0.01__seed=0", "optimizer=SGD__lr=0.01__seed=1",
        "optimizer=SGD__lr=0.3__seed=0", "optimizer=SGD__lr=0.3__seed=1", "optimizer=AdamW__seed=5",
    ]
    sgd = runs[2].config
    assert sgd["seed_everything"] == 0 and runs[1].config["seed_everything"] == 1
    assert sgd["model"]["init_args"]["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.3}}
    assert sgd["trainer"]["max_epochs"] == 2  # the study's `set`
    assert sgd["data"]["class_path"] == "lightning_spectral.data.DigitsDataModule"  # from the base
    assert runs[2].axes == {"optimizer": "SGD", "lr": "0.3"} and runs[2].values["lr"] == 0.3
    assert runs[0].group == runs[1].group == "optimizer=SGD, lr=0.01"


def test_the_same_labels_with_another_config_are_refused(tmp_path: Path) -> None:
    sgd = {"model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}}
    path = write_study(tmp_path, grids=[{"optimizer": [{"name": "SGD", "set": sgd}]},
                                        {"optimizer": [{"name": "SGD", "set": {}}]}])  # the base's SGD: momentum 0.9
    with pytest.raises(StudySpecError, match="optimizer=SGD__seed=0 is also in an earlier grid, with another config"):
        load_study(path)


def test_unknown_diagnostics_key_is_refused_with_the_closest_one(tmp_path: Path) -> None:
    with pytest.raises(StudySpecError, match="diagnostics: unknown key 'sharpnes'; did you mean 'sharpness'"):
        load_study(write_study(tmp_path, diagnostics={"sharpnes": False}))


def test_set_dotted_merges_dicts_and_replaces_class_specs() -> None:
    config = {"opt": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}}
    set_dotted(config, "opt", {"init_args": {"lr": 0.2}})  # no class_path: merged
    assert config["opt"]["init_args"] == {"lr": 0.2, "momentum": 0.9}
    set_dotted(config, "opt", {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-3}})  # a class spec: replaced
    assert config["opt"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-3}}
    set_dotted(config, "opt.init_args.nesterov", True)
    assert config["opt"]["init_args"] == {"lr": 1e-3, "nesterov": True}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_studies_expand(path: Path) -> None:
    study = load_study(path)
    runs = expand(study)
    assert runs and len({r.run_id for r in runs}) == len(runs)
    for run in runs:
        assert isinstance(run.config["seed_everything"], int)
        assert run.config["model"]["init_args"]["optimizer"]["class_path"]
        for key in ("lr", "spectral_budget", "weight_decay", "momentum"):  # YAML 1.1 reads `1e-3` as a string
            value = run.config["model"]["init_args"]["optimizer"].get("init_args", {}).get(key)
            assert value is None or isinstance(value, (int, float)), (run.run_id, key, value)
    for key in ("divergence_threshold", "steps_per_lr", "num_lrs"):
        assert not isinstance(study.scan.get(key), str)


# -- aggregation ------------------------------------------------------------------------------
def test_mean_std_is_sample_std_over_finite_values() -> None:
    stat = mean_std([0.9, 0.8, 0.7, math.nan])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.8) and stat["std"] == pytest.approx(0.1)
    one = mean_std([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"])
    assert mean_std([])["n"] == 0


def test_group_results_aggregates_seeds(tmp_path: Path) -> None:
    runs = expand(load_study(write_study(tmp_path, seeds=[0, 1, 2])))
    results = []
    for run in runs:
        acc = {"SGD": 0.5, "MuonSGD": 0.7}[run.axes["optimizer"]] + 0.1 * run.seed
        history = [{"epoch": 1, "val_acc": acc - 0.1}, {"epoch": 2, "val_acc": acc}]
        results.append((run, {"seed": run.seed, "status": "finished", "final_val_acc": acc, "history": history}))
    groups = group_results(results)
    assert list(groups) == ["optimizer=SGD", "optimizer=MuonSGD"]
    stats = groups["optimizer=MuonSGD"]["stats"]["final_val_acc"]
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.8) and stats["std"] == pytest.approx(0.1)
    curve = groups["optimizer=SGD"]["curves"]
    assert curve["mean"][0]["val_acc"] == pytest.approx(0.5) and curve["std"][1]["val_acc"] == pytest.approx(0.1)


# -- running, resume, collect, print-runs -------------------------------------------------------
def test_run_resume_collect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    study = load_study(write_study(tmp_path, diagnostics={"sharpness": False, "noise_scale": False,
                                                          "keep_checkpoints": True}))
    out = tmp_path / "out"
    done = run_study(study, out, log=lambda _: None)
    assert done == {"ran": ["optimizer=SGD__seed=0", "optimizer=MuonSGD__seed=0"], "skipped": [], "failed": []}
    run_dir = out / "tiny" / "runs" / "optimizer=MuonSGD__seed=0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["epochs"] == 2 and len(result["history"]) == 2
    assert result["resumed_from"] is None  # a run never interrupted
    assert {"train_loss", "val_acc", "max_spectral_norm", "step_time_ms", "lr"} <= set(result["history"][-1])
    assert result["final_solver_inner_iterations"] == 0  # exact clipping: no iterations
    assert set(result["final_spectral_norms"]) == {"net.features.0", "net.features.2", "net.fc1", "net.fc2"}
    assert (run_dir / "run.yaml").exists() and list((run_dir / "tensorboard").rglob("events.out.tfevents*"))

    # A re-run skips finished runs.
    assert run_study(study, out, log=lambda _: None) == {"ran": [], "skipped": [r.run_id for r in expand(study)],
                                                         "failed": []}
    # An interrupted run (no result.json) resumes from last.ckpt, keeping the recorded epochs.
    (run_dir / "result.json").unlink()
    assert [r.run_id for r in pending_runs(study, out)] == ["optimizer=MuonSGD__seed=0"]
    assert run_study(study, out, log=lambda _: None)["ran"] == ["optimizer=MuonSGD__seed=0"]
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["history"] == result["history"]
    # A damaged last.ckpt is moved aside with a message; the run resumes from the other checkpoint.
    (run_dir / "result.json").unlink()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    messages: list[str] = []
    assert run_study(study, out, log=messages.append)["ran"] == ["optimizer=MuonSGD__seed=0"]
    assert len(list((run_dir / "checkpoints").glob("last.ckpt.corrupt-*"))) == 1
    assert any("moved aside" in m for m in messages)
    again = json.loads((run_dir / "result.json").read_text())
    assert again["resumed_from"].endswith(".ckpt") and again["history"] == result["history"]
    # A changed config makes the run pending again.
    changed = load_study(write_study(tmp_path), {"set.optimizer_note": None, "seeds": [0],
                                                 "set.trainer.limit_val_batches": 2})
    assert len(pending_runs(changed, out)) == 2

    report = collect(study, out, docs_dir=tmp_path / "docs")
    summary = (report / "summary.md").read_text()
    assert "| SGD | 1 |" in summary and "| MuonSGD | 1 |" in summary
    data = json.loads((report / "results.json").read_text())
    assert len(data["runs"]) == 2 and data["groups"][0]["stats"]["final_val_acc"]["n"] == 1
    assert (report / "runs.csv").read_text().count("\n") == 3 and (report / "tiny_metrics.png").stat().st_size > 0
    assert "](figures/tiny_metrics.png)" in (tmp_path / "docs" / "tiny.md").read_text()


def test_print_runs_and_cli_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path)
    args = ["study", "--config", str(path), "--out_dir", "out", "--max_epochs", "1"]
    assert cli_main([*args, "--print_runs"]) is None
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2
    first = shlex.split(commands[0])
    assert first[:4] == ["python", "-m", "lightning_spectral", "study"]
    assert first[-2:] == ["--run", "optimizer=SGD__seed=0"] and "--max_epochs" in first and "--print_runs" not in first
    cli_main(first[3:])  # the printed command runs that run only (in process)
    capsys.readouterr()
    cli_main([*args, "--print_runs"])
    assert capsys.readouterr().out.strip().splitlines() == commands[1:]  # only the pending one is left
    cli_main([*args, "--print_runs", "--all"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    cli_main([*args, "--collect"])
    assert (tmp_path / "out" / "tiny" / "report" / "summary.md").exists()
    out = capsys.readouterr().out  # the summary table of the one finished run printed at the end
    assert "## Summary" in out and "| SGD | 1 |" in out and "| MuonSGD |" not in out


def test_study_options_are_not_abbreviated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``--out`` for ``--out_dir`` was read, but the per-run commands of --print_runs (and --jobs) pass options on by
    their full names, so those runs went to logs/studies: an abbreviation is refused, naming the option meant."""
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_main(["study", "--config", str(path), "--out", "elsewhere", "--print_runs"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --out elsewhere" in err and "unknown option --out; did you mean '--out_dir'" in err
    assert not (tmp_path / "logs").exists()


def test_study_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """0 when every run finished, 1 when one failed (here: a negative learning rate), 2 for a bad file."""
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, grids=[{"optimizer": [
        {"name": "bad", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                              "init_args": {"lr": -1.0}}}},
    ]}])
    assert study_main(["--config", str(path), "--out_dir", "out"]) == 1
    assert "failed: optimizer=bad__seed=0" in capsys.readouterr().err
    # a run whose config the CLI refuses (an unknown argument: the parser exits) fails alone, the next one runs
    path = write_study(tmp_path, grids=[{"optimizer": [
        {"name": "typo", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                               "init_args": {"lr": 0.05, "momentun": 0.9}}}},
        {"name": "SGD", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD",
                                                              "init_args": {"lr": 0.05}}}},
    ]}])
    assert study_main(["--config", str(path), "--out_dir", "out2"]) == 1
    err = capsys.readouterr().err
    assert "failed: optimizer=typo__seed=0" in err and "SGD__seed=0" not in err.split("failed:")[-1]
    assert (tmp_path / "out2" / "tiny" / "runs" / "optimizer=SGD__seed=0" / "result.json").exists()
    assert "RunConfigError" in (tmp_path / "out2" / "tiny" / "runs" / "optimizer=typo__seed=0" / "error.txt").read_text()
    (tmp_path / "typo.yaml").write_text(path.read_text().replace("grids:", "grid:"))
    assert study_main(["--config", str(tmp_path / "typo.yaml")]) == 2
    assert "grid" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: x\n  grids: [\n")
    assert study_main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert f"error: {tmp_path / 'broken.yaml'} is not valid YAML" in capsys.readouterr().err


def test_jobs_runs_each_run_in_its_own_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``--jobs 2``: both runs as separate processes with their threads split and their output in
    runs/<id>/log.txt; a failing run is reported with its log and makes the exit status 1; the
    others finish and the summary table is printed."""
    import os

    from lightning_spectral.experiments.parallel import default_threads

    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, grids=[{"optimizer": [
        {"name": "SGD", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}}},
        {"name": "bad", "set": {"model.init_args.optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": -1.0}}}},
    ]}])
    assert study_main(["--config", str(path), "--out_dir", "out", "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    runs = tmp_path / "out" / "tiny" / "runs"
    good, bad = runs / "optimizer=SGD__seed=0", runs / "optimizer=bad__seed=0"
    assert json.loads((good / "result.json").read_text())["status"] == "finished"
    assert not (bad / "result.json").exists() and "Invalid learning rate" in (bad / "log.txt").read_text()
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // 2)
    assert default_threads(2) == threads
    first = shlex.split((good / "log.txt").read_text().splitlines()[0][2:])
    assert first[1:4] == ["-m", "lightning_spectral", "study"] and first[-4:] == ["--threads", str(threads), "--run",
                                                                                  "optimizer=SGD__seed=0"]
    assert "FAILED optimizer=bad__seed=0" in captured.err and "Invalid learning rate" in captured.err
    assert "[tiny] 1 done, 0 running, 1 failed, 0 pending" in captured.err
    assert "## Summary" in captured.out and "| SGD | 1 |" in captured.out and "| bad |" not in captured.out
    assert study_main(["--config", str(path), "--out_dir", "out", "--jobs", "0"]) == 2


def test_slurm_array_script_and_its_tasks_run_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys) -> None:
    """``--slurm`` writes a complete array script over the pending runs and a data-preparation
    script under flock; run here with SLURM_ARRAY_TASK_ID set, task 2 trains the second run."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("flock") is None:
        pytest.skip("flock(1) is not installed")
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path)
    env_line = f"export PATH={Path(sys.executable).parent}:$PATH"
    args = ["--config", str(path), "--out_dir", "out"]
    assert study_main([*args, "--slurm", "--partition", "debug", "--time", "00:10:00", "--gpus-per-task", "1",
                       "--cpus-per-task", "2", "--mem", "4G", "--env", env_line]) == 0
    out = capsys.readouterr().out
    slurm = tmp_path / "out" / "tiny" / "slurm"
    assert f"sbatch --dependency=afterok:$jid {slurm / 'array.sbatch'}" in out
    script = (slurm / "array.sbatch").read_text()
    directives = {line.split("=", 1)[0]: line.split("=", 1)[-1] for line in script.splitlines()
                  if line.startswith("#SBATCH")}
    assert directives["#SBATCH --array"] == "1-2" and directives["#SBATCH --partition"] == "debug"
    assert directives["#SBATCH --time"] == "00:10:00" and directives["#SBATCH --gpus-per-task"] == "1"
    assert directives["#SBATCH --cpus-per-task"] == "2" and directives["#SBATCH --mem"] == "4G"
    assert directives["#SBATCH --chdir"] == str(tmp_path) and directives["#SBATCH --output"].endswith("%A_%a.out")
    assert "#SBATCH --requeue" in directives and directives["#SBATCH --signal"].startswith("B:USR1@")
    assert env_line in script and "scontrol requeue" in script
    assert (slurm / "runs.txt").read_text().splitlines() == [r.run_id for r in expand(load_study(path))]
    prepare = (slurm / "prepare.sh").read_text()
    assert "flock 9" in prepare and "--prepare_data" in prepare and "--gpus-per-task" not in prepare

    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "1"}
    done = subprocess.run(f"bash {slurm / 'prepare.sh'} && bash {slurm / 'array.sbatch'}", shell=True, cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prepare_data: DigitsDataModule" in done.stdout and "task 2: run optimizer=MuonSGD__seed=0" in done.stdout
    runs = tmp_path / "out" / "tiny" / "runs"
    assert json.loads((runs / "optimizer=MuonSGD__seed=0" / "result.json").read_text())["status"] == "finished"
    assert not (runs / "optimizer=SGD__seed=0" / "result.json").exists()  # task 1's run is still pending
    assert study_main([*args, "--slurm"]) == 0  # the script now covers the one pending run
    assert (slurm / "runs.txt").read_text().splitlines() == ["optimizer=SGD__seed=0"]
    assert "#SBATCH --array=1-1" in (slurm / "array.sbatch").read_text()


def test_slurm_task_stops_its_run_and_requeues_on_usr1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """USR1 to the array task's shell (``--signal=B:USR1@...`` before the time limit): the run
    stops on SIGTERM keeping its checkpoint, and the task requeues itself (a stand-in
    ``scontrol`` records the call); without a working ``scontrol`` the task exits 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path / 'requeued'}\n")
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env_line = f"export PATH={tmp_path / 'bin'}:{Path(sys.executable).parent}:$PATH"
    assert study_main(["--config", str(path), "--out_dir", "out", "--max_epochs", "500", "--slurm",
                       "--env", env_line]) == 0
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77"}
    task = subprocess.Popen(["bash", "out/tiny/slurm/array.sbatch"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "out" / "tiny" / "runs" / "optimizer=SGD__seed=0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and task.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    task.send_signal(signal.SIGUSR1)
    out, _ = task.communicate(timeout=120)
    assert task.returncode == 0, out
    assert "Received SIGTERM" in out and last.exists()
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "77_1"]
    assert not last.parent.parent.joinpath("result.json").exists()  # pending: the requeued task resumes it


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_study_and_names_the_runs_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys, signum: str) -> None:
    """The signal comes during the first run's fit, at the end of its second epoch (SIGTERM stops it
    at the next batch, SIGINT at once; either way its last checkpoint stays): the study exits 128 + N naming the stopped run and the one not
    started, the run lock is free, the signal handlers are back; the same command resumes it."""
    import os
    import signal

    from lightning_spectral.callbacks import EpochRecorder
    from lightning_spectral.checkpoint import run_lock

    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, set={"trainer.max_epochs": 3, "trainer.limit_train_batches": 2,
                                      "trainer.limit_val_batches": 0.05, "trainer.accelerator": "cpu",
                                      "data.init_args.batch_size": 16})
    number, handlers = getattr(signal, signum), [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    epoch_end = EpochRecorder.on_train_epoch_end

    def signal_in_the_second_epoch(self, trainer, pl_module) -> None:
        epoch_end(self, trainer, pl_module)
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), number)

    monkeypatch.setattr(EpochRecorder, "on_train_epoch_end", signal_in_the_second_epoch)
    args = ["--config", str(path), "--out_dir", "out"]
    assert study_main(args) == 128 + number
    err = capsys.readouterr().err
    assert f"study interrupted by {signum}; stopped 1 run(s)" in err and "checkpoint: optimizer=SGD__seed=0" in err
    assert "1 run(s) not started: optimizer=MuonSGD__seed=0" in err and "run the same command again" in err
    runs = tmp_path / "out" / "tiny" / "runs"
    assert (runs / "optimizer=SGD__seed=0" / "checkpoints" / "last.ckpt").exists()
    assert not (runs / "optimizer=SGD__seed=0" / "result.json").exists() and not (runs / "optimizer=MuonSGD__seed=0").exists()
    with run_lock(runs / "optimizer=SGD__seed=0"):
        pass
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
    monkeypatch.setattr(EpochRecorder, "on_train_epoch_end", epoch_end)
    assert study_main(args) == 0
    result = json.loads((runs / "optimizer=SGD__seed=0" / "result.json").read_text())
    assert result["resumed_from"].endswith("last.ckpt") and result["epochs"] == 3


@pytest.mark.slow  # three study processes (≈ 30 s)
def test_sigterm_to_a_study_then_rerun_equals_the_uninterrupted_study(tmp_path: Path) -> None:
    """SIGTERM (a scheduler's warning) once the run's first epoch is checkpointed: the study exits
    143; running the same command again resumes the run and ends with the uninterrupted study's
    numbers, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_study(tmp_path, grids=[{"optimizer": [{"name": "SGD", "set": {}}]}],
                       set={"trainer.max_epochs": 5, "trainer.limit_val_batches": 2, "trainer.accelerator": "cpu",
                            "data.init_args.batch_size": 16})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def study(out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "lightning_spectral", "study", "--config", str(path),
                                 "--out_dir", out], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    reference = study("full")
    assert reference.wait(timeout=400) == 0, reference.stderr.read()[-3000:]
    interrupted = study("stopped")
    run = tmp_path / "stopped" / "tiny" / "runs" / "optimizer=SGD__seed=0"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and interrupted.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=300) == 143, interrupted.stderr.read()[-3000:]
    assert not (run / "result.json").exists()  # stopped before the end
    rerun = study("stopped")
    assert rerun.wait(timeout=400) == 0, rerun.stderr.read()[-3000:]
    done = json.loads((run / "result.json").read_text())
    full = json.loads((tmp_path / "full" / "tiny" / "runs" / "optimizer=SGD__seed=0" / "result.json").read_text())
    assert done.get("resumed_from")
    timing = ("time", "step_time_ms", "mean_step_time_ms", "total_time_s", "final_time", "final_step_time_ms")
    assert done["epochs"] == full["epochs"] == 5
    compared = [k for k in full if (k.startswith("final_") or k == "best_val_acc") and k not in timing]
    assert {"final_val_acc", "final_val_loss"} <= set(compared)
    assert {k: done[k] for k in compared} == {k: full[k] for k in compared}
    for before, after in zip(full["history"], done["history"]):  # every epoch, also those before the stop
        assert {k: v for k, v in before.items() if k not in timing} == {k: v for k, v in after.items() if k not in timing}


@pytest.mark.slow  # a study process and its two run processes (≈ 20 s)
def test_sigterm_to_a_study_with_jobs_stops_and_reaps_its_run_processes(tmp_path: Path) -> None:
    """``study --jobs 2`` with both runs training: SIGTERM to the parent stops both run processes
    (each at its next batch, keeping its checkpoint), reaps them, frees their locks and exits 143
    naming them; no process of the study is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lightning_spectral.checkpoint import run_lock

    path = write_study(tmp_path, set={"trainer.max_epochs": 500, "trainer.limit_train_batches": 2,
                                      "trainer.limit_val_batches": 0.05, "trainer.accelerator": "cpu",
                                      "data.init_args.batch_size": 16})
    study = subprocess.Popen([sys.executable, "-m", "lightning_spectral", "study", "--config", str(path), "--out_dir",
                              "out", "--jobs", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = tmp_path / "out" / "tiny" / "runs"
    ids = [r.run_id for r in expand(load_study(path))]
    deadline = time.time() + 300
    while not all((runs / i / "checkpoints" / "last.ckpt").exists() for i in ids):
        assert study.poll() is None and time.time() < deadline, study.communicate()
        time.sleep(0.1)
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_of(int(p.name)) == study.pid]
    assert len(children) == 2
    study.send_signal(signal.SIGTERM)
    _, err = study.communicate(timeout=300)
    assert study.returncode == 143, err[-3000:]
    assert "study interrupted by SIGTERM; stopped 2 run(s)" in err and all(i in err for i in ids)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    for i in ids:
        assert "Received SIGTERM" in (runs / i / "log.txt").read_text()  # each stopped by Lightning at a batch
        assert (runs / i / "checkpoints" / "last.ckpt").exists() and not (runs / i / "result.json").exists()
        with run_lock(runs / i):  # free
            pass


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# -- lr_stability_scan ------------------------------------------------------------------------
class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))


def quadratic(curvature: float):
    return lambda model, x, y: 0.5 * curvature * model.w**2


LOADER = [(torch.zeros(1), torch.zeros(1))]


def test_lr_scan_matches_the_gradient_descent_threshold() -> None:
    """GD on ½Lw² multiplies w by (1 − ηL): it converges for η < 2/L and diverges above."""
    curvature = 4.0  # 2/L = 0.5
    out = lr_stability_scan(Scalar, lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), quadratic(curvature),
                            LOADER, lr_range=(0.05, 2.0), num_lrs=12, steps_per_lr=300)
    lrs = np.logspace(np.log10(0.05), np.log10(2.0), 12)
    assert out["lr_values"] == pytest.approx(list(lrs))
    assert out["converged"] == [bool(lr < 2 / curvature) for lr in lrs]
    assert out["max_stable_lr"] == pytest.approx(max(lr for lr in lrs if lr < 2 / curvature))
    assert all(math.isinf(v) for v, ok in zip(out["final_losses"], out["converged"]) if not ok)
    assert all(v < 1e-3 for v, ok in zip(out["final_losses"], out["converged"]) if ok)


def test_lr_scan_without_a_stable_lr_returns_nan() -> None:
    """If the smallest lr diverges there is no stable lr: NaN, not the smallest lr."""
    out = lr_stability_scan(Scalar, lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), quadratic(4.0), LOADER,
                            lr_values=[3.0, 1.0, 0.1], steps_per_lr=200)
    assert out["lr_values"] == [0.1, 1.0, 3.0] and out["converged"] == [True, False, False]
    assert out["max_stable_lr"] == pytest.approx(0.1)
    none = lr_stability_scan(Scalar, lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), quadratic(4.0), LOADER,
                             lr_values=[1.0, 3.0], steps_per_lr=200)
    assert none["converged"] == [False, False] and math.isnan(none["max_stable_lr"])


def test_lr_scan_on_a_network_is_reproducible() -> None:
    torch.manual_seed(0)
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(3)]
    ce = lambda model, x, y: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    kwargs = dict(lr_range=(1e-2, 1e4), num_lrs=4, steps_per_lr=20, divergence_threshold=50.0)
    a = lr_stability_scan(lambda: nn.Linear(4, 3), lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), ce, data, **kwargs)
    b = lr_stability_scan(lambda: nn.Linear(4, 3), lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), ce, data, **kwargs)
    assert a == b and a["converged"][0] and not a["converged"][-1]


def test_lr_scan_builds_the_optimizer_with_the_runs_routing() -> None:
    from lightning_spectral.experiments.build import build_optimizer
    from lightning_spectral.models import SmallCNN
    from lightning_spectral.optim.base import AUX_ADAMW

    net = SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=0.25)
    spec = {"class_path": "lightning_spectral.optim.ManifoldMuon", "init_args": {}}

    def head_group(init: dict) -> dict:
        optimizer = build_optimizer({"model": {"init_args": {"optimizer": spec, **init}}}, net, lr=0.05)
        return next(g for g in optimizer.param_groups if any(p is net.fc2.weight for p in g["params"]))

    assert head_group({})["matrix"] is False and head_group({})["lr"] == AUX_ADAMW["lr"]  # the fallback rule
    assert head_group({"head_as_matrix": True})["matrix"] is True
    assert head_group({"head": [], "exclude": []})["matrix"] is True  # no head: the last Linear is a matrix
