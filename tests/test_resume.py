"""A killed run resumed from its last checkpoint equals the uninterrupted run.

The real CLI runs the quick start (digits, every diagnostic callback on, ``ModelCheckpoint(save_last=True)``)
three times in subprocesses: uninterrupted; killed with ``os._exit`` (no cleanup, no save) in the
middle of an epoch, after the previous epoch's checkpoint was written; and resumed with
``--ckpt_path .../last.ckpt``. A probe callback (written into ``tmp_path`` and put on ``PYTHONPATH``
so that every rank imports it) records each step's loss bit for bit and, at the end, the weights,
the optimizer state and the callbacks' state. Everything after the checkpoint must be identical:
losses, weights, optimizer state (momentum, dual variables, solver warm starts), the cosine
schedule (it is a function of the restored step) and the monitors' smoothed state.

On 2 processes (gloo) the same, marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BATCHES, EPOCHS, KILL_AT = 4, 3, 10  # checkpoints after steps 4 and 8; killed at step 10

PROBE = textwrap.dedent(
    '''
    """Written by tests/test_resume.py; imported by every rank through PYTHONPATH."""
    import os
    import signal

    import torch
    from lightning.pytorch.callbacks import Callback


    class Probe(Callback):
        def __init__(self, path: str, kill_at: int = -1, sigterm: bool = False) -> None:
            self.path, self.kill_at, self.sigterm = path, kill_at, sigterm

        def _file(self, trainer, suffix):
            return f"{self.path}.rank{trainer.global_rank}.{suffix}"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            with open(self._file(trainer, "losses"), "a") as f:
                f.write(f"{trainer.global_step} {float(loss).hex()}\\n")
            if trainer.global_step == self.kill_at and self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before its time limit
            elif trainer.global_step == self.kill_at:
                os._exit(3)  # a hard kill: no teardown, no checkpoint

        def on_train_end(self, trainer, pl_module):
            torch.save({
                "weights": pl_module.state_dict(),
                "optimizer": trainer.optimizers[0].state_dict(),
                "callbacks": {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                              if type(cb).__module__.startswith("lightning_spectral")},
            }, self._file(trainer, "end.pt"))
    '''
)


def _fit(cwd: Path, probe_dir: Path, tag: str, extra: list[str], kill_at: int = -1, ckpt: Path | None = None,
         sigterm: bool = False):
    cwd.mkdir(exist_ok=True)
    probe = json.dumps({"class_path": "resume_probe.Probe",
                        "init_args": {"path": str(probe_dir / tag), "kill_at": kill_at, "sigterm": sigterm}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(probe_dir), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    args = [sys.executable, "-m", "lightning_spectral", "fit", "--config", str(QUICKSTART),
            f"--trainer.callbacks+={probe}", f"--trainer.max_epochs={EPOCHS}",
            f"--trainer.limit_train_batches={BATCHES}", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def _losses(path: Path) -> dict[int, str]:
    return {int(step): value for step, value in (line.split() for line in path.read_text().splitlines())}


def _assert_equal(a, b, where: str, rtol: float = 0.0) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a, b) if rtol == 0 else torch.allclose(a, b, rtol=rtol, atol=0), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}", rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]", rtol)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rtol) or (a != a and b != b), (where, a, b)  # NaN: not yet estimated
    else:
        assert a == b, (where, a, b)


def _check_resume(tmp_path: Path, extra: list[str], ranks: int, callback_rtol: float = 0.0,
                  sigterm: bool = False) -> None:
    (tmp_path / "resume_probe.py").write_text(PROBE)
    full = _fit(tmp_path / "full", tmp_path, "full", extra)
    assert full.returncode == 0, full.stderr[-4000:]
    killed = _fit(tmp_path / "killed", tmp_path, "killed", extra, kill_at=KILL_AT, sigterm=sigterm)
    assert killed.returncode == (143 if sigterm else 3), (killed.returncode, killed.stderr[-4000:])
    ckpt = tmp_path / "killed" / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), sorted(str(p) for p in (tmp_path / "killed").rglob("*.ckpt"))
    saved_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step == 2 * BATCHES  # the last epoch end before the kill
    resumed = _fit(tmp_path / "killed", tmp_path, "resumed", extra, ckpt=ckpt)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in range(ranks):
        reference = _losses(tmp_path / f"full.rank{rank}.losses")
        after = _losses(tmp_path / f"resumed.rank{rank}.losses")
        assert sorted(after) == list(range(saved_step + 1, EPOCHS * BATCHES + 1))
        assert {s: reference[s] for s in after} == after, f"rank {rank}: losses differ after resuming"
        end_full = torch.load(tmp_path / f"full.rank{rank}.end.pt", weights_only=True)
        end_resumed = torch.load(tmp_path / f"resumed.rank{rank}.end.pt", weights_only=True)
        _assert_equal(end_full["weights"], end_resumed["weights"], f"rank{rank}.weights")
        _assert_equal(end_full["optimizer"], end_resumed["optimizer"], f"rank{rank}.optimizer")
        if rank == 0:  # the checkpoint holds rank 0's callbacks (rank-zero monitors keep nothing elsewhere)
            _assert_equal(end_full["callbacks"], end_resumed["callbacks"], "rank0.callbacks", callback_rtol)


OPTIMIZERS = {
    "muon_sgd_dual_ascent": ROOT / "configs" / "optim" / "muon_sgd_dual_ascent.yaml",
    "manifold_muon_amortized": ROOT / "configs" / "optim" / "manifold_muon_amortized.yaml",
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_killed_run_resumes_identically(tmp_path: Path, name: str) -> None:
    _check_resume(tmp_path, ["--config", str(OPTIMIZERS[name])], ranks=1)


@pytest.mark.slow  # three CLI runs in subprocesses (≈ 25 s of CPU); the in-process SIGTERM test below is fast
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_fit_exits_143_and_the_rerun_resumes_identically(tmp_path: Path) -> None:
    """SIGTERM at step 10 (mid-epoch): the CLI exits with status 143 (was 0); the rerun from the
    last end-of-epoch checkpoint equals the uninterrupted run."""
    _check_resume(tmp_path, ["--config", str(OPTIMIZERS["muon_sgd_dual_ascent"])], ranks=1, sigterm=True)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="2-process gloo DDP through the popen launcher")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_killed_ddp_run_resumes_identically(tmp_path: Path, name: str) -> None:
    # Weights and optimizer state bit for bit. The gradient-noise monitor's running sums agree to
    # 1e-6 relative only: it sums squared norms per DDP gradient bucket, and DDP rebuilds its
    # buckets after the first step of every run, so the resumed run adds in another order
    # (measured: 5e-9 relative).
    _check_resume(tmp_path, ["--config", str(OPTIMIZERS[name]), "--trainer.strategy=ddp",
                             "--trainer.devices=2", "--trainer.accelerator=cpu"], ranks=2, callback_rtol=1e-6)


# -- resume policy: what the checkpoint and the requested run may differ in ----------------------
import warnings  # noqa: E402

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from lightning_spectral.data import DigitsDataModule  # noqa: E402
from lightning_spectral.models import SmallCNN  # noqa: E402
from lightning_spectral.module import CheckpointMismatchError, CosineSchedule, SpectralModule  # noqa: E402


def _module(width: float = 0.25, lr: float = 0.1, momentum: float = 0.9, optimizer=None, scheduler=None):
    optimizer = optimizer or (lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum))
    net = SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=width)
    return SpectralModule(net, 10, optimizer=optimizer, scheduler=scheduler)


def _trainer(tmp_path: Path, epochs: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def _first_run(tmp_path: Path, module: SpectralModule) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 1, callbacks=[checkpoint]).fit(module, DigitsDataModule(batch_size=32))
    return Path(checkpoint.last_model_path)


class LearningRates(Callback):
    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_resume_with_another_optimizer_class_or_network_raises(tmp_path: Path) -> None:
    last = _first_run(tmp_path, _module())
    adamw = _module(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    with pytest.raises(CheckpointMismatchError, match=r"trained with torch\.optim\.sgd\.SGD, the requested optimizer "
                                                      r"is torch\.optim\.adamw\.AdamW"):
        _trainer(tmp_path, 2).fit(adamw, DigitsDataModule(batch_size=32), ckpt_path=last)
    wider = _module(width=0.5)
    for run in ("fit", "validate"):
        with pytest.raises(CheckpointMismatchError, match=r"does not fit the requested model") as info:
            getattr(_trainer(tmp_path, 2), run)(wider, DigitsDataModule(batch_size=32), ckpt_path=last)
        assert "net.features.0.weight: checkpoint (8, 1, 3, 3), requested (16, 1, 3, 3)" in str(info.value)
        assert "Start a new run" in str(info.value)


def test_a_checkpoint_names_a_package_optimizer_by_its_public_path() -> None:
    """Checkpoints written before the constrained optimizers moved into ``optim.constrained`` named
    ManifoldMuon by ``optim.manifold``: still the same class; another class or package is not."""
    from lightning_spectral.optim import ManifoldMuon, Oblique
    from lightning_spectral.resume import qualname, same_class

    now = f"{ManifoldMuon.__module__}.{ManifoldMuon.__qualname__}"
    assert same_class("lightning_spectral.optim.manifold.ManifoldMuon", now)
    assert same_class("lightning_spectral.optim.geometric.Oblique", f"{Oblique.__module__}.Oblique")
    assert not same_class("lightning_spectral.optim.manifold.SpectralBall", now)
    assert not same_class("other_package.optim.manifold.ManifoldMuon", now)
    assert not same_class("torch.optim.sgd.SGD", qualname(torch.optim.AdamW([torch.zeros(1, requires_grad=True)])))


@pytest.mark.parametrize("scheduled", [False, True])
def test_resume_applies_changed_hyperparameters(tmp_path: Path, scheduled: bool) -> None:
    """A new learning rate and momentum are applied to the restored optimizer (the schedule keeps
    its point: the new base lr times the restored factor) and listed in a warning."""
    schedule = (lambda opt: CosineSchedule(opt, total_steps=10)) if scheduled else None
    last = _first_run(tmp_path, _module(scheduler=schedule))
    rates = LearningRates()
    module = _module(lr=0.2, momentum=0.5, scheduler=schedule)
    changes = r"matrix\.lr: 0\.1 -> 0\.2, matrix\.momentum: 0\.9 -> 0\.5, .*vector\.lr: 0\.1 -> 0\.2"
    with pytest.warns(UserWarning, match=changes):
        _trainer(tmp_path, 2, callbacks=[rates]).fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 10)) if scheduled else 1.0
    groups = module.optimizers().optimizer.param_groups
    assert rates.seen[0] == pytest.approx([0.2 * factor] * len(groups))  # the first resumed step (step 3)
    assert [g["momentum"] for g in groups] == [0.5] * len(groups)
    if scheduled:
        assert [g["initial_lr"] for g in groups] == module.lr_schedulers().base_lrs == [0.2] * len(groups)


def test_resume_without_changes_warns_nothing(tmp_path: Path) -> None:
    last = _first_run(tmp_path, _module())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming from")
        _trainer(tmp_path, 2).fit(_module(), DigitsDataModule(batch_size=32), ckpt_path=last)


def test_cli_resume_policy(run_cli, tmp_path: Path) -> None:
    """Through the CLI. LightningCLI itself replaces the config's model arguments by the
    checkpoint's (``_parse_ckpt_path``), which would hide every difference; SpectralCLI keeps the
    config as given for the module to compare."""
    short = ["--config", str(QUICKSTART), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    run_cli("fit", *short, "--trainer.max_epochs=1")
    last = tmp_path / "logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"matrix\.lr: 0\.05 -> 0\.1"):
        cli = run_cli("fit", *short, "--trainer.max_epochs=2", "--model.init_args.optimizer.init_args.lr=0.1",
                      f"--ckpt_path={last}")
    assert {g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups} == {0.1}
    with pytest.raises(CheckpointMismatchError, match=r"net: checkpoint .*'width_mult': 1\.0.*requested .*0\.5"):
        run_cli("validate", *short, "--model.init_args.net.init_args.width_mult=0.5", f"--ckpt_path={last}")


# -- SIGTERM ---------------------------------------------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402

from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from lightning_spectral.signals import SIGTERM_EXIT_CODE, SigtermNotice, exit_code  # noqa: E402


class SendSigterm(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def _sigterm_fit(trainer: Trainer, ckpt_path: Path | None = None) -> SpectralModule:
    seed_everything(0)
    module = _module(scheduler=lambda opt: CosineSchedule(opt, warmup_steps=2))
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module


def _sigterm_trainer(tmp_path: Path, name: str, callbacks: list) -> Trainer:
    return _trainer(tmp_path, 3, callbacks=[ModelCheckpoint(dirpath=tmp_path / name, save_last=True), *callbacks])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_resumably_and_the_rerun_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    """SIGTERM in the middle of epoch 1 (step 5 of 3×3): Lightning stops at the batch boundary;
    the notice names last.ckpt of epoch 0 (step 3); rerunning from it ends with the uninterrupted
    run's weights bit for bit; the exit status is 143."""
    full = _sigterm_fit(_sigterm_trainer(tmp_path, "full", []))
    last = tmp_path / "stopped" / "last.ckpt"
    stopped = _sigterm_trainer(tmp_path, "stopped", [SendSigterm(at_step=5)])
    with pytest.raises(SIGTERMException) as info, pytest.warns(UserWarning, match=rf"resume from {last}"):
        _sigterm_fit(stopped)
    assert exit_code(info.value) == SIGTERM_EXIT_CODE == 143 and exit_code(ValueError()) is None
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert next(c for c in stopped.callbacks if isinstance(c, SigtermNotice)).resume_from == str(last)
    resumed = _sigterm_fit(_sigterm_trainer(tmp_path, "stopped", []), ckpt_path=last)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
