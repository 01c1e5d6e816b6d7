"""Bad inputs and faults: each gives a clear error naming the problem, or the correct behaviour.

First the fault tests through the real CLI (NaN injected at a given step), then one table of
bad inputs, each row asserting the error type and that the message names the problem.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from lightning_spectral.module import NonFiniteStepError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

INJECTOR = textwrap.dedent(
    '''
    """Written by tests/test_failures.py: puts a NaN into a gradient or the loss at given batches."""
    import torch
    from lightning.pytorch.callbacks import Callback


    class NaNInjector(Callback):
        def __init__(self, batches: list, where: str = "grad") -> None:
            self.batches, self.where, self.calls = set(batches), where, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.calls += 1
            if self.where == "loss" and self.calls in self.batches:
                batch[0].fill_(float("nan"))

        def on_after_backward(self, trainer, pl_module):
            if self.where == "grad" and self.calls in self.batches:
                weight = pl_module.net.fc1.weight if hasattr(pl_module.net, "fc1") else next(pl_module.parameters())
                weight.grad.view(-1)[3] = float("inf")
    '''
)

ADAMW = "model: {init_args: {optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.001}}}}\n"
OPTIMIZERS = {  # config overlays of the quick start
    "SGD": None,  # the quick start's own
    "AdamW": ADAMW,
    "MuonSGD": (ROOT / "configs" / "optim" / "muon_sgd_spectral_clip.yaml").read_text(),
}
BATCHES = 3  # per epoch; ModelCheckpoint(save_last=True) writes last.ckpt and the top-1 file after each epoch


def _fit_with_nan(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, batches: list[int],
                  where: str = "grad", *extra: str):
    (tmp_path / "nan_injector.py").write_text(INJECTOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    injector = json.dumps({"class_path": "nan_injector.NaNInjector", "init_args": {"batches": batches, "where": where}})
    overlay = []
    if OPTIMIZERS[optimizer] is not None:
        (tmp_path / "optimizer.yaml").write_text(OPTIMIZERS[optimizer])
        overlay = ["--config", str(tmp_path / "optimizer.yaml")]
    return run_cli("fit", "--config", str(QUICKSTART), *overlay, f"--trainer.callbacks+={injector}",
                   "--trainer.max_epochs=3", f"--trainer.limit_train_batches={BATCHES}",
                   "--trainer.limit_val_batches=1", *extra)


def _checkpoints(tmp_path: Path) -> dict[str, dict]:
    paths = sorted((tmp_path / "logs").rglob("*.ckpt"))
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in paths}


def _assert_finite(checkpoints: dict[str, dict]) -> None:
    assert checkpoints
    for name, state in checkpoints.items():
        for key, value in state["state_dict"].items():
            assert not value.is_floating_point() or torch.isfinite(value).all(), (name, key)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_nan_gradient_stops_the_run_and_keeps_the_good_checkpoints(run_cli, tmp_path, monkeypatch, optimizer) -> None:
    """Inf in a gradient at the 2nd batch of the 2nd epoch (step 4): the run stops before the step,
    naming it; last.ckpt and the top-1 checkpoint of epoch 0 stay on disk, finite and loadable."""
    with pytest.raises(NonFiniteStepError) as info:
        _fit_with_nan(run_cli, tmp_path, monkeypatch, optimizer, [BATCHES + 2])
    message = str(info.value)
    assert "non-finite gradient at step 4 (epoch 1, batch 1)" in message and "net.fc1.weight" in message
    checkpoints = _checkpoints(tmp_path)
    assert set(checkpoints) == {"last.ckpt", "epoch=0-step=3.ckpt"}
    assert checkpoints["last.ckpt"]["global_step"] == BATCHES
    assert "last.ckpt" in message and "--ckpt_path" in message
    _assert_finite(checkpoints)


def test_nan_loss_with_skip_policy_skips_and_counts(run_cli, tmp_path, monkeypatch) -> None:
    """nonfinite=skip: NaN inputs at two batches skip those two steps; the run finishes, every
    checkpoint is finite and ``train/skipped_steps`` counts 2."""
    cli = _fit_with_nan(run_cli, tmp_path, monkeypatch, "SGD", [2, BATCHES + 3], "loss",
                        "--model.init_args.nonfinite=skip")
    assert cli.trainer.global_step == 3 * BATCHES - 2 and cli.model.skipped_steps == 2
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 2.0
    checkpoints = _checkpoints(tmp_path)
    assert checkpoints["last.ckpt"]["spectral_module"]["skipped_steps"] == 2
    _assert_finite(checkpoints)


def test_skip_policy_stops_after_max_consecutive_skips(run_cli, tmp_path, monkeypatch) -> None:
    with pytest.raises(NonFiniteStepError, match=r"3 steps in a row skipped \(max_consecutive_skips=3\)"):
        _fit_with_nan(run_cli, tmp_path, monkeypatch, "MuonSGD", [BATCHES + 1, BATCHES + 2, BATCHES + 3], "grad",
                      "--model.init_args.nonfinite=skip", "--model.init_args.max_consecutive_skips=3")
    _assert_finite(_checkpoints(tmp_path))


# -- the table -------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import yaml  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402

import lightning_spectral.callbacks as callbacks  # noqa: E402
import lightning_spectral.optim as optim  # noqa: E402
from lightning_spectral.checkpoint import (  # noqa: E402
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    RunLockedError,
    UnsafeCheckpointError,
    atomic_torch_save,
    resume_checkpoint,
    run_lock,
    validate_checkpoint,
    write_config_marker,
)
from lightning_spectral.config_policy import ConfigObjectRefused  # noqa: E402
from lightning_spectral.data import DigitsDataModule  # noqa: E402
from lightning_spectral.launch import MainPortInUseError  # noqa: E402
from lightning_spectral.experiments.spec import StudySpecError, expand, load_study  # noqa: E402
from lightning_spectral.models import SmallCNN  # noqa: E402
from conftest import OverflowAtSecondStep  # noqa: E402
from lightning_spectral.module import CheckpointMismatchError, CosineSchedule, SpectralModule  # noqa: E402


@dataclass
class Row:
    """One bad input or fault: ``run(ctx)`` raises ``error`` with every string of ``names`` in
    its message, or (``error=None``) asserts the correct behaviour itself."""

    id: str
    run: Callable[[Any], Any]
    error: type[BaseException] | None = None
    names: tuple[str, ...] = field(default_factory=tuple)


class CLIError(Exception):
    """The command line's error output, for a table row."""


def net(width: float = 0.25) -> nn.Module:
    return SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=width)


def module(width: float = 0.25, optimizer=None, **kwargs) -> SpectralModule:
    return SpectralModule(net(width), 10, optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)), **kwargs)


def trainer(ctx, epochs: int = 1, **kwargs) -> Trainer:
    kwargs = {"limit_train_batches": 2, "limit_val_batches": 1, **kwargs}
    return Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=ctx.tmp, **kwargs)


class Context:
    def __init__(self, tmp: Path, last: Path) -> None:
        self.tmp, self.last = tmp, last

    def study(self, **study) -> Path:
        """A study file: quick-start base, one SGD/Muon optimizer axis, unless overridden (``None`` drops a key)."""
        spec = {"name": "t", "base": str(QUICKSTART), "seeds": [0],
                "grids": [{"optimizer": [{"name": "SGD", "set": {}}]}]}
        spec.update(study)
        path = self.tmp / "study.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
        return path

    def copy_last(self, name: str, transform: Callable[[bytes], bytes]) -> Path:
        path = self.tmp / name
        path.write_bytes(transform(self.last.read_bytes()))
        return path

    def fit_from(self, ckpt: Path, model: SpectralModule | None = None, run: str = "fit") -> None:
        getattr(trainer(self, 2), run)(model or module(), DigitsDataModule(batch_size=32), ckpt_path=ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """last.ckpt of one short SGD fit, shared by the rows."""
    tmp = tmp_path_factory.mktemp("trained")
    checkpoint = ModelCheckpoint(dirpath=tmp, save_last=True)
    Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint]).fit(
        module(), DigitsDataModule(batch_size=32))
    return Path(checkpoint.last_model_path)


def _axis(values) -> list:
    return [{"optimizer": values}]


def _flip(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted(ctx) -> Path:
    path = ctx.tmp / "crafted.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(str(ctx.tmp / "ran"))}, path)
    return path


def _legacy_copy(ctx, name: str = "legacy.ckpt") -> Path:
    """The shared last.ckpt in torch's legacy (non-zip) format."""
    path = ctx.tmp / name
    torch.save(torch.load(ctx.last, weights_only=True), path, _use_new_zipfile_serialization=False)
    return path


def _truncated_legacy(ctx) -> Path:
    path = _legacy_copy(ctx, "cut-legacy.ckpt")
    path.write_bytes(path.read_bytes()[:500])
    return path


def _nonfinite_copy(ctx, where: str) -> Path:
    """The shared last.ckpt with a NaN weight or momentum buffer, saved whole (its CRCs valid)."""
    state = torch.load(ctx.last, weights_only=True)
    if where == "weight":
        state["state_dict"]["net.fc1.weight"][0, 0] = float("nan")
    else:
        state["optimizer_states"][0]["state"][0] = {"momentum_buffer": torch.full((2,), float("nan"))}
    path = ctx.tmp / f"nan-{where}.ckpt"
    atomic_torch_save(state, path)
    return path


def _momentum_module():
    return module(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def _nan_momentum_state_dict() -> None:
    """Plain PyTorch use: a package optimizer's load_state_dict refuses a NaN momentum buffer."""
    params = _one_param()
    optimizer = optim.MuonSGD(params, lr=0.1)
    params[0].grad = torch.randn(4, 4)
    optimizer.step()
    state = optimizer.state_dict()
    next(iter(state["state"].values()))["momentum_buffer"].fill_(float("nan"))
    optim.MuonSGD(_one_param(), lr=0.1).load_state_dict(state)


def _forensic_load(ctx) -> None:
    loaded = SpectralModule.load_from_checkpoint(_nonfinite_copy(ctx, "weight"), net=net(), allow_nonfinite=True)
    assert loaded.net.fc1.weight.isnan().any()


def _poisoned_save(ctx) -> None:
    model = module()
    fit = trainer(ctx)
    fit.fit(model, DigitsDataModule(batch_size=32))
    with torch.no_grad():
        model.net.fc1.weight[0, 0] = float("nan")
    fit.save_checkpoint(ctx.tmp / "poisoned.ckpt")


def _overflow_mid_epoch(ctx) -> None:
    """Found at the next step's check, not taken for a non-finite loss to skip: before, two
    skipped steps stopped the run as 'non-finite loss', the weights called 'those before it'."""
    model = module(optimizer=lambda p: OverflowAtSecondStep(p, lr=0.1), nonfinite="skip", max_consecutive_skips=2)
    try:
        trainer(ctx, limit_train_batches=6, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
    finally:
        assert model.skipped_steps == 0


def _inf_lr(ctx) -> None:  # finite gradients, an update that overflows the weights
    trainer(ctx, limit_train_batches=1).fit(module(optimizer=lambda p: torch.optim.SGD(p, lr=float("inf")),
                                                   scheduler=None),
                                            DigitsDataModule(batch_size=32))


def _no_net_classes() -> None:
    SpectralModule(nn.Sequential(nn.Flatten(), nn.ReLU()))


def _float_labels(ctx) -> None:
    runs = expand(load_study(ctx.study(grids=[{"lr": {"key": "model.init_args.optimizer.init_args.lr",
                                                      "values": [0.1, 0.1000001]}}])))
    assert [r.axes["lr"] for r in runs] == ["0.1", "0.1000001"] and len({r.run_id for r in runs}) == 2


def _overlapping_grids(ctx) -> None:
    variant = {"name": "SGD", "set": {"model.init_args.optimizer.init_args.lr": 0.2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = expand(load_study(ctx.study(grids=[_axis([variant])[0], _axis([variant])[0]])))
    assert len(runs) == 1


def _overlapping_grids_differ(ctx) -> None:
    a = {"name": "SGD", "set": {"model.init_args.optimizer.init_args.lr": 0.2}}
    b = {"name": "SGD", "set": {"model.init_args.optimizer.init_args.lr": 0.3}}
    with pytest.raises(StudySpecError, match="is also in an earlier grid, with another config"):
        load_study(ctx.study(grids=[_axis([a])[0], _axis([b])[0]]))


def _lr_axis_before_optimizer_axis(ctx) -> None:
    """The lr axis listed first still sets the lr inside the optimizer another axis replaces whole."""
    adamw = {"model.init_args.optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}
    runs = expand(load_study(ctx.study(grids=[{"lr": {"key": "model.init_args.optimizer.init_args.lr",
                                                      "values": [0.01, 0.3]},
                                               "optimizer": [{"name": "AdamW", "set": adamw}]}])))
    assert [r.config["model"]["init_args"]["optimizer"] for r in runs] == [
        {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}} for lr in (0.01, 0.3)]


def _string_optimizer(ctx) -> None:
    base = yaml.safe_load(QUICKSTART.read_text())
    base["model"]["init_args"]["optimizer"] = "torch.optim.SGD"
    load_study(ctx.study(base=base, grids=[{"lr": {"key": "model.init_args.optimizer.init_args.lr",
                                                   "values": [0.1]}}]))


def _stale_config(ctx) -> None:
    directory = ctx.tmp / "ckpts"
    atomic_torch_save({"state_dict": {}}, directory / "last.ckpt")
    write_config_marker(directory, "old")
    assert resume_checkpoint(directory, "new", lambda _: None) is None and not directory.exists()


def _empty_last_falls_back(ctx) -> None:
    directory = ctx.tmp / "ckpts"
    atomic_torch_save({"state_dict": {}}, directory / "epoch=0-step=2.ckpt")
    (directory / "last.ckpt").write_bytes(b"")
    write_config_marker(directory, "h")
    assert resume_checkpoint(directory, "h", lambda _: None).name == "epoch=0-step=2.ckpt"
    assert len(list(directory.glob("last.ckpt.corrupt-*"))) == 1


def _mode_follows_umask(ctx) -> None:
    import os

    previous = os.umask(0o027)
    try:
        atomic_torch_save({"state_dict": {}}, ctx.tmp / "shared.ckpt")
    finally:
        os.umask(previous)
    assert (ctx.tmp / "shared.ckpt").stat().st_mode & 0o777 == 0o640  # was 0o600 (mkstemp's)


def _nan_last_falls_back(ctx) -> None:
    """A study resume passes over a last.ckpt holding NaN for the newest finite checkpoint."""
    directory = ctx.tmp / "ckpts"
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, directory / "epoch=0-step=2.ckpt")
    atomic_torch_save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, directory / "last.ckpt")
    write_config_marker(directory, "h")
    assert resume_checkpoint(directory, "h", lambda _: None).name == "epoch=0-step=2.ckpt"
    assert len(list(directory.glob("last.ckpt.corrupt-*"))) == 1


def _locked(ctx) -> None:
    with run_lock(ctx.tmp / "run"), run_lock(ctx.tmp / "run"):
        pass


def _one_param(shape=(4, 4)) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(*shape))]


def _nan_step(optimizer_cls, **kwargs) -> None:
    params = _one_param()
    optimizer = optimizer_cls(params, **kwargs)
    params[0].grad = torch.full_like(params[0], float("nan"))
    before = params[0].detach().clone()
    try:
        optimizer.step()
    finally:
        assert torch.equal(params[0], before)  # no weight changed


class _NaNAtSecondCall(nn.CrossEntropyLoss):
    calls = 0

    def forward(self, logits, y):
        self.calls += 1
        loss = super().forward(logits, y)
        return loss * float("nan") if self.calls == 2 else loss


def _sgd_nan_module_step(ctx) -> None:
    model = module(nonfinite="skip")
    model.criterion = _NaNAtSecondCall()
    fit = trainer(ctx, limit_train_batches=3, limit_val_batches=0)
    fit.fit(model, DigitsDataModule(batch_size=32))
    assert model.skipped_steps == 1 and fit.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


ROWS = [
    # SpectralModule arguments
    Row("module-nonfinite-policy", lambda c: module(nonfinite="ignore"), ValueError, ("nonfinite", "'ignore'")),
    Row("module-max-skips-zero", lambda c: module(max_consecutive_skips=0), ValueError, ("max_consecutive_skips",)),
    Row("module-max-skips-bool", lambda c: module(max_consecutive_skips=True), ValueError, ("max_consecutive_skips",)),
    Row("module-vector-weight-decay", lambda c: module(vector_weight_decay=-1.0), ValueError, ("vector_weight_decay",)),
    Row("module-one-class", lambda c: SpectralModule(net(), num_classes=1), ValueError, ("num_classes must be >= 2",)),
    Row("module-no-class-count", lambda c: _no_net_classes(), ValueError, ("num_classes: pass it",)),
    Row("module-plateau-scheduler", lambda c: module(scheduler=ReduceLROnPlateau).configure_optimizers(), TypeError,
        ("ReduceLROnPlateau",)),
    # CosineSchedule
    Row("cosine-negative-warmup", lambda c: CosineSchedule(torch.optim.SGD(_one_param(), lr=1), warmup_steps=-1),
        ValueError, ("warmup_steps must be >= 0",)),
    Row("cosine-min-lr-ratio", lambda c: CosineSchedule(torch.optim.SGD(_one_param(), lr=1), min_lr_ratio=2.0),
        ValueError, ("min_lr_ratio",)),
    Row("cosine-horizon-within-warmup", lambda c: CosineSchedule(torch.optim.SGD(_one_param(), lr=1), total_steps=4,
                                                                  warmup_steps=4),
        ValueError, ("total_steps (4) must exceed warmup_steps (4)", "train longer")),
    Row("cosine-unset-horizon", lambda c: CosineSchedule(torch.optim.SGD(_one_param(), lr=1)).lr_factor(1),
        RuntimeError, ("total_steps is unset",)),
    # Training setups that cannot train
    Row("batch-larger-than-dataset", lambda c: trainer(c, limit_train_batches=None).fit(
        module(), DigitsDataModule(batch_size=5000)), ValueError, ("batch_size 5000 exceeds the", "training samples")),
    Row("batch-larger-than-dataset-constant-lr", lambda c: trainer(c, limit_train_batches=None).fit(
        module(scheduler=None), DigitsDataModule(batch_size=5000)), ValueError, ("batch_size 5000 exceeds",)),
    Row("no-training-batches", lambda c: trainer(c, limit_train_batches=0).fit(module(), DigitsDataModule()),
        ValueError, ("limit_train_batches is 0",)),
    Row("max-steps-zero-ends-at-once", lambda c: _no_step(c, "max_steps")),
    Row("max-steps-zero-constant-lr-ends-at-once", lambda c: _no_step(c, "max_steps", scheduler=None)),
    Row("max-epochs-zero-ends-at-once", lambda c: _no_step(c, "max_epochs")),
    Row("cli-max-steps-zero-ends-at-once", lambda c: _cli_no_step(c)),
    Row("unbounded-cosine", lambda c: trainer(c, epochs=-1).fit(module(), DigitsDataModule()), ValueError,
        ("trainer.max_epochs or trainer.max_steps",)),
    # Non-finite values never reach the weights or a checkpoint
    Row("nan-loss-skipped", _sgd_nan_module_step),
    Row("nan-weights-not-saved", _poisoned_save, NonFiniteStepError, ("refusing to write a checkpoint",
                                                                      "net.fc1.weight")),
    Row("overflowing-update", _inf_lr, NonFiniteStepError, ("made the weight", "non-finite")),
    Row("overflow-mid-epoch-found-at-the-next-step", _overflow_mid_epoch, NonFiniteStepError,
        ("the optimizer step at step 2 made the weight 'net.features.0.weight' non-finite",)),
    Row("muonsgd-nan-gradient", lambda c: _nan_step(optim.MuonSGD, lr=0.1), optim.NonFiniteGradientError,
        ("holds NaN or Inf", "no weight was changed")),
    Row("muon-nan-gradient", lambda c: _nan_step(optim.Muon, lr=0.1), optim.NonFiniteGradientError,
        ("holds NaN or Inf",)),
    # Resuming from a checkpoint of something else
    Row("resume-other-optimizer", lambda c: c.fit_from(c.last, module(optimizer=lambda p: torch.optim.AdamW(p))),
        CheckpointMismatchError, ("torch.optim.sgd.SGD", "torch.optim.adamw.AdamW", "Start a new run")),
    Row("resume-other-network", lambda c: c.fit_from(c.last, module(width=0.5)), CheckpointMismatchError,
        ("net.fc1.weight", "requested (128, 128)")),
    Row("validate-other-network", lambda c: c.fit_from(c.last, module(width=0.5), "validate"),
        CheckpointMismatchError, ("does not fit the requested model",)),
    Row("test-other-network", lambda c: c.fit_from(c.last, module(width=0.5), "test"), CheckpointMismatchError,
        ("does not fit the requested model",)),
    # Damaged, unsafe and missing checkpoint files
    Row("ckpt-empty", lambda c: c.fit_from(c.copy_last("empty.ckpt", lambda b: b"")), CorruptCheckpointError,
        ("empty.ckpt", "empty file")),
    Row("ckpt-truncated", lambda c: c.fit_from(c.copy_last("cut.ckpt", lambda b: b[: len(b) // 2])),
        CorruptCheckpointError, ("cut.ckpt", "truncated")),
    Row("ckpt-bit-flip", lambda c: c.fit_from(c.copy_last("flip.ckpt", _flip)), CorruptCheckpointError,
        ("flip.ckpt", "CRC-32 mismatch")),
    Row("ckpt-crafted-pickle", lambda c: c.fit_from(_crafted(c)), UnsafeCheckpointError,
        ("crafted.ckpt", "weights_only=True")),
    Row("ckpt-missing", lambda c: c.fit_from(c.tmp / "missing.ckpt"), FileNotFoundError, ("missing.ckpt",)),
    Row("ckpt-crafted-load-from-checkpoint-file-url", lambda c: SpectralModule.load_from_checkpoint(
        _crafted(c).as_uri(), net=net()), UnsafeCheckpointError, ("crafted.ckpt", "weights_only=True")),
    Row("ckpt-nan-weight-refused", lambda c: c.fit_from(_nonfinite_copy(c, "weight")), NonFiniteCheckpointError,
        ("nan-weight.ckpt", "weight 'net.fc1.weight'", "allow_nonfinite=True")),
    Row("ckpt-nan-momentum-refused", lambda c: c.fit_from(_nonfinite_copy(c, "momentum"), _momentum_module()),
        NonFiniteCheckpointError, ("nan-momentum.ckpt", "optimizer state 'momentum_buffer' of parameter")),
    Row("ckpt-nan-load-from-checkpoint-refused", lambda c: SpectralModule.load_from_checkpoint(
        _nonfinite_copy(c, "weight"), net=net()), NonFiniteCheckpointError, ("weight 'net.fc1.weight'",)),
    Row("ckpt-nan-allowed-for-forensics", _forensic_load),
    Row("ckpt-nan-not-picked-for-a-study-resume", lambda c: _nan_last_falls_back(c)),
    Row("optimizer-load-state-dict-nan-momentum", lambda c: _nan_momentum_state_dict(), ValueError,
        ("momentum_buffer", "holds NaN or Inf")),
    Row("ckpt-legacy-format-resumes", lambda c: c.fit_from(_legacy_copy(c))),
    Row("ckpt-file-url-resumes", lambda c: c.fit_from(c.last.as_uri())),
    Row("ckpt-legacy-truncated", lambda c: c.fit_from(_truncated_legacy(c)), CorruptCheckpointError,
        ("cut-legacy.ckpt", "truncated legacy-format checkpoint")),
    Row("ckpt-not-lightning", lambda c: (torch.save({"w": torch.ones(1)}, c.tmp / "w.pt"),
                                         print(validate_checkpoint(c.tmp / "w.pt")),
                                         None if validate_checkpoint(c.tmp / "w.pt") is None else
                                         (_ for _ in ()).throw(ValueError(validate_checkpoint(c.tmp / "w.pt")))),
        ValueError, ("not a Lightning checkpoint",)),
    Row("ckpt-stale-config-restarts", _stale_config),
    Row("ckpt-empty-last-falls-back", _empty_last_falls_back),
    Row("ckpt-mode-follows-umask", _mode_follows_umask),
    Row("run-locked", _locked, RunLockedError, ("in use by pid",)),
    # Study files
    Row("study-grid-for-grids", lambda c: load_study(c.study(grid=[{}])), StudySpecError,
        ("unknown key 'grid'", "did you mean 'grids'")),
    Row("study-sets-for-set", lambda c: load_study(c.study(sets={"trainer.max_epochs": 1})), StudySpecError,
        ("'sets'", "did you mean 'set'")),
    Row("study-seed-for-seeds", lambda c: load_study(c.study(seed=[1])), StudySpecError, ("did you mean 'seeds'",)),
    Row("study-axis-keys-for-key", lambda c: load_study(c.study(grids=[{"lr": {"keys": "x", "values": [1]}}])),
        StudySpecError, ("axis 'lr'", "unknown key 'keys'", "did you mean 'key'")),
    Row("study-axis-missing-values", lambda c: load_study(c.study(grids=[{"lr": {"key": "x"}}])), StudySpecError,
        ("axis 'lr'", "missing key 'values'")),
    Row("study-axis-values-not-list", lambda c: load_study(c.study(grids=[{"lr": {"key": "x", "values": 0.1}}])),
        StudySpecError, ("'values' must be a non-empty list",)),
    Row("study-axis-empty", lambda c: load_study(c.study(grids=[{"optimizer": []}])), StudySpecError,
        ("axis 'optimizer'", "non-empty list")),
    Row("study-variant-without-name", lambda c: load_study(c.study(grids=_axis([{"set": {}}]))), StudySpecError,
        ("missing key 'name'",)),
    Row("study-variant-not-mapping", lambda c: load_study(c.study(grids=_axis(["SGD"]))), StudySpecError,
        ("every variant is a mapping", "'SGD'")),
    Row("study-variant-sets", lambda c: load_study(c.study(grids=_axis([{"name": "A", "sets": {}}]))),
        StudySpecError, ("variant 'A'", "did you mean 'set'")),
    Row("study-label-collision", lambda c: load_study(c.study(grids=_axis([{"name": "Muon (a)"},
                                                                          {"name": "Muon [a]"}]))),
        StudySpecError, ("'Muon [a]' and 'Muon (a)' give the same run id",)),
    Row("study-label-twice", lambda c: load_study(c.study(grids=_axis([{"name": "SGD"}, {"name": "SGD"}]))),
        StudySpecError, ("'SGD' twice",)),
    Row("study-value-twice", lambda c: load_study(c.study(grids=[{"lr": {"key": "model.init_args.optimizer."
                                                                                "init_args.lr",
                                                                         "values": [0.1, 0.1]}}])),
        StudySpecError, ("'0.1' twice",)),
    Row("study-close-float-labels", _float_labels),
    Row("study-overlapping-grids", _overlapping_grids),
    Row("study-overlapping-grids-differ", _overlapping_grids_differ),
    Row("study-arg-beside-class-path", lambda c: load_study(c.study(
        grids=[{"lr": {"key": "model.init_args.optimizer.lr", "values": [0.1]}}])), StudySpecError,
        ("beside class_path", "model.init_args.optimizer.init_args.lr")),
    Row("study-lr-axis-before-optimizer-axis", _lr_axis_before_optimizer_axis),
    Row("study-key-into-string", _string_optimizer, StudySpecError, ("'torch.optim.SGD', not a mapping",)),
    Row("study-misspelt-branch", lambda c: load_study(c.study(set={"model.init_args.optimzer.init_args.lr": 1})),
        StudySpecError, ("did you mean 'optimizer'",)),
    Row("study-no-base", lambda c: load_study(c.study(base=None)), StudySpecError, ("missing key 'base'",)),
    Row("study-base-not-found", lambda c: load_study(c.study(base="nope.yaml")), StudySpecError,
        ("base 'nope.yaml' not found", "relative to the study file")),
    Row("study-bad-kind", lambda c: load_study(c.study(kind="scan")), StudySpecError, ("kind must be",)),
    Row("study-seeds-string", lambda c: load_study(c.study(seeds="0,1")), StudySpecError,
        ("seeds must be a non-empty list of integers",)),
    Row("study-grid-seeds-without-axes", lambda c: load_study(c.study(grids=[{"seeds": [1]}])), StudySpecError,
        ("'seeds' but no 'axes'",)),
    Row("study-grid-seed-typo", lambda c: load_study(c.study(grids=[{"axes": {}, "seed": [1]}])), StudySpecError,
        ("did you mean 'seeds'",)),
    Row("study-not-a-mapping", lambda c: (c.tmp.joinpath("l.yaml").write_text("- 1\n"), load_study(c.tmp / "l.yaml")),
        StudySpecError, ("must be a mapping",)),
    Row("study-diagnostics-list", lambda c: load_study(c.study(diagnostics=["spectral"])), StudySpecError,
        ("diagnostics must be a mapping",)),
    Row("study-set-list", lambda c: load_study(c.study(set=["trainer.max_epochs"])), StudySpecError,
        ("expected a mapping of dotted keys",)),
    # Optimizers and callbacks (existing checks)
    Row("muonsgd-negative-lr", lambda c: optim.MuonSGD(_one_param(), lr=-1), ValueError, ("lr must be >= 0",)),
    Row("muonsgd-zero-budget", lambda c: optim.MuonSGD(_one_param(), lr=0.1, spectral_budget=0), ValueError,
        ("spectral_budget",)),
    Row("muonsgd-unknown-solver", lambda c: optim.MuonSGD(_one_param(), lr=0.1, inner_solver="nope"), ValueError,
        ("unknown inner solver 'nope'", "spectral_clip")),
    Row("muonsgd-momentum-one", lambda c: optim.MuonSGD(_one_param(), lr=0.1, momentum=1.5), ValueError,
        ("momentum must be in [0, 1)",)),
    Row("muon-nan-lr", lambda c: optim.Muon(_one_param(), lr=float("nan")), ValueError, ("lr must be >= 0 and finite",)),
    Row("muon-lr-overflows-float32", lambda c: optim.Muon(_one_param(), lr=1e308), ValueError,
        ("lr=1e+308", "largest float32")),
    Row("muon-lr-times-decay-overflows", lambda c: optim.Muon(_one_param(), lr=1e37, weight_decay=100.0), ValueError,
        ("lr·weight_decay", "overflows float32")),
    Row("muon-lr-set-to-overflow-later", lambda c: _lr_changed_to_overflow(), ValueError,
        ("param group 0", "lr=1e+308", "largest float32")),
    Row("muonsgd-step-overflows", lambda c: _overflowing_step(True), optim.NonFiniteGradientError,
        ("parameter 'net.w'", "every gradient was finite", "weights were put back")),
    Row("muonsgd-lazy-step-overflows", lambda c: _overflowing_step("lazy"), optim.NonFiniteGradientError,
        ("1 step(s)", "made a weight non-finite")),
    Row("manifold-muon-empty-matrix", lambda c: _empty_matrix_is_skipped(optim.ManifoldMuon)),
    Row("spectral-ball-empty-matrix", lambda c: _empty_matrix_is_skipped(optim.SpectralBall)),
    Row("manifold-muon-huge-gradient", lambda c: _huge_gradient_steps_as_its_direction(optim.ManifoldMuon)),
    Row("spectral-ball-huge-gradient", lambda c: _huge_gradient_steps_as_its_direction(optim.SpectralBall)),
    Row("muon-negative-weight-decay", lambda c: optim.Muon(_one_param(), lr=0.1, weight_decay=-1), ValueError,
        ("weight_decay must be >= 0",)),
    Row("monitor-zero-cadence", lambda c: callbacks.SpectralNormMonitor(every_n_steps=0), ValueError,
        ("every_n_steps must be a positive int",)),
    Row("monitor-two-cadences", lambda c: callbacks.SpectralNormMonitor(every_n_steps=5, every_n_epochs=1),
        ValueError, ("either every_n_steps or every_n_epochs",)),
    Row("monitor-unknown-method", lambda c: callbacks.SpectralNormMonitor(method="nope"), ValueError,
        ("method must be one of",)),
    Row("noise-scale-unknown-mode", lambda c: callbacks.GradientNoiseScaleMonitor(mode="nope"), ValueError,
        ("mode must be one of",)),
    Row("data-zero-batch", lambda c: DigitsDataModule(batch_size=0), ValueError, ("batch_size must be >= 1",)),
    Row("data-val-fraction", lambda c: DigitsDataModule(val_fraction=1.5), ValueError, ("val_fraction",)),
    # Geometric optimizers on inputs they cannot constrain
    Row("doubly-stochastic-1x1", lambda c: optim.DoublyStochastic(_one_param((1, 1)), lr=0.1), ValueError,
        ("DoublyStochastic", "(1, 1)")),
    Row("spectral-ball-zero-matrix", lambda c: optim.SpectralBall([nn.Parameter(torch.zeros(4, 4))], lr=0.1),
        ValueError, ("zero matrix", "nonzero")),
    Row("sl-muon-zero-matrix", lambda c: optim.SLMuon([nn.Parameter(torch.zeros(4, 4))], lr=0.1), ValueError,
        ("zero matrix", "det W = 1")),
    Row("symplectic-zero-matrix-on-constraint", lambda c: _symplectic_from_zero()),
    Row("meta-device-parameters", lambda c: optim.MuonSGD([nn.Parameter(torch.zeros(4, 4, device="meta"))], lr=0.1)),
    Row("state-dict-of-other-shapes", lambda c: _other_shapes_state(), ValueError,
        ("momentum_buffer", "has shape (4, 4), but this parameter needs (8, 4)")),
    # The command line
    Row("cli-yaml-syntax-error", lambda c: _cli_error(c, "fit", "--config", str(_write(c, "bad.yaml", "a: [\n"))),
        CLIError, ("bad.yaml is not valid YAML",)),
    Row("cli-unknown-net", lambda c: _cli_error(c, "fit", "--config", str(QUICKSTART), "--model.init_args.net=NoNet"),
        CLIError, ("Networks of the package: MLP, SmallCNN",)),
    # What a config or a study file may run: classes of the expected kind; functions only when registered
    Row("config-optimizer-os-system-yaml", lambda c: _cli_error(c, "fit", "--config", str(QUICKSTART), "--config",
                                                                str(_write(c, "evil.yaml", yaml.safe_dump(
                                                                    {"model": {"init_args": {"optimizer": OS_SYSTEM}}})))),
        CLIError, ("'os.system' is a built-in function, not a class", "register_config_function")),
    # A function named on the command line where a class goes, refused before it runs:
    # (row id, key, value; None: os.system as a class_path dict)
    *(Row(row_id, lambda c, key=key, value=value: _cli_error(c, "fit", "--config", str(QUICKSTART),
                                                            f"{key}={value or json.dumps(OS_SYSTEM)}"),
          CLIError, (f"'{value}' is a function, not a class" if value else
                     "'os.system' is a built-in function, not a class", *more))
      for row_id, key, value, more in [
          ("config-optimizer-os-system-command-line", "--model.init_args.optimizer", None, ()),
          ("config-optimizer-returns-optimizer", "--model.init_args.optimizer", "ls_payload.sgd",
           ("may name any class of the kind its key expects",)),
          ("config-scheduler-os-system", "--model.init_args.scheduler", None, ()),
          ("config-scheduler-function", "--model.init_args.scheduler", "ls_payload.scheduler", ()),
          ("config-net-function", "--model.init_args.net", "ls_payload.net", ()),
          ("config-callback-function", "--trainer.callbacks+", "ls_payload.callback", ()),
      ]),
    Row("study-variant-os-system", lambda c: _study_run_error(c, {"model.init_args.optimizer": OS_SYSTEM}),
        CLIError, ("'os.system' is a built-in function, not a class", "its config does not parse")),
    Row("study-variant-scheduler-os-system", lambda c: _study_run_error(c, {"model.init_args.scheduler": OS_SYSTEM}),
        CLIError, ("'os.system' is a built-in function, not a class",)),
    Row("lr-scan-optimizer-os-system", lambda c: _scan_build(c, "optimizer", OS_SYSTEM), ConfigObjectRefused,
        ("'os.system' is a built-in function, not a class",)),
    Row("lr-scan-data-other-class", lambda c: _scan_build(c, "data", {"class_path": "subprocess.Popen", "init_args": {
        "args": ["touch", str(c.tmp / "ran")]}}), ConfigObjectRefused,
        ("'subprocess.Popen' is a class, but not a lightning.pytorch.core.datamodule.LightningDataModule",)),
    # Starting several processes
    Row("ddp-busy-master-port", lambda c: _busy_master_port(), MainPortInUseError,
        ("is in use by another process", "no rank was started", "unset MASTER_PORT")),
    Row("cli-bad-nonfinite-policy", lambda c: _cli_error(c, "fit", "--config", str(QUICKSTART),
                                                         "--model.init_args.nonfinite=maybe",
                                                         "--trainer.max_epochs=0"),
        ValueError, ("nonfinite must be one of", "'maybe'")),
]


def _write(ctx, name: str, text: str) -> Path:
    (ctx.tmp / name).write_text(text)
    return ctx.tmp / name


OS_SYSTEM = {"class_path": "os.system", "init_args": {"command": "touch ran"}}  # run, it would write ./ran
PAYLOAD = textwrap.dedent(
    '''
    """Written by tests/test_failures.py: functions of the right return type that configs name; each writes ./ran."""
    from pathlib import Path

    import torch
    from lightning.pytorch.callbacks import Callback
    from torch import nn


    def sgd(params, lr: float = 0.1) -> torch.optim.Optimizer:
        Path("ran").touch()
        return torch.optim.SGD(params, lr=lr)


    def scheduler(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        Path("ran").touch()
        return torch.optim.lr_scheduler.ConstantLR(optimizer)


    def net() -> nn.Module:
        Path("ran").touch()
        return nn.Flatten()


    def callback() -> Callback:
        Path("ran").touch()
        return Callback()
    '''
)


@contextlib.contextmanager
def _in(ctx):
    """In ``ctx.tmp``, with ``ls_payload`` (:data:`PAYLOAD`) importable."""
    _write(ctx, "ls_payload.py", PAYLOAD)
    cwd = os.getcwd()
    os.chdir(ctx.tmp)
    sys.path.insert(0, str(ctx.tmp))
    try:
        yield
    finally:
        sys.path.remove(str(ctx.tmp))
        sys.modules.pop("ls_payload", None)
        os.chdir(cwd)


def _cli_error(ctx, *args: str) -> None:
    from lightning_spectral.cli import cli_main

    stderr = io.StringIO()
    with _in(ctx):
        try:
            with contextlib.redirect_stderr(stderr):
                cli_main([*args, "--trainer.enable_progress_bar=false"])
        except SystemExit as err:
            raise CLIError(f"exit {err.code}: {stderr.getvalue()}") from None


def _study_run_error(ctx, variant: dict) -> None:
    """One run of a study whose variant sets ``variant``, through the study runner."""
    from lightning_spectral.experiments.runner import RunConfigError, execute_train

    study = load_study(ctx.study(grids=_axis([{"name": "evil", "set": variant}])))
    stderr = io.StringIO()
    with _in(ctx), contextlib.redirect_stderr(stderr):
        try:
            execute_train(study, expand(study)[0], ctx.tmp / "out", log=lambda _: None)
        except RunConfigError as err:
            raise CLIError(f"{err}\n{stderr.getvalue()}") from None


def _scan_build(ctx, key: str, spec: dict) -> None:
    """The lr scan's builder (no jsonargparse) on a config whose ``key`` is ``spec``."""
    from lightning_spectral.experiments.build import build_data, build_optimizer

    with _in(ctx):
        if key == "data":
            build_data({"data": spec})
        else:
            build_optimizer({"model": {"init_args": {"optimizer": spec}}}, net(), 0.1)


def _no_step(ctx, limit: str, **kwargs) -> None:
    """``trainer.<limit>=0`` asks for no step: as in Lightning, the fit ends at once, weights untouched."""
    model = module(**kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(ctx, epochs=0) if limit == "max_epochs" else trainer(ctx, max_steps=0)
    fit.fit(model, DigitsDataModule(batch_size=32))
    assert fit.global_step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _cli_no_step(ctx) -> None:
    """The issue's ``--trainer.max_steps 0`` (it said "the training dataset is empty")."""
    from lightning_spectral.cli import cli_main

    with _in(ctx):
        cli = cli_main(["fit", "--config", str(QUICKSTART), "--trainer.max_steps=0", "--trainer.logger=false", "--trainer.callbacks=[]",
                        "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 0 and cli.trainer.state.finished


def _busy_master_port() -> None:
    """What the CLI checks before Lightning's launcher starts rank 1 (tests/test_launch.py: end to end)."""
    import socket

    from lightning_spectral.launch import check_main_port

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen(1)
        before = os.environ.get("MASTER_PORT")
        os.environ["MASTER_PORT"] = str(held.getsockname()[1])
        try:
            check_main_port(Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False))
        finally:
            os.environ.pop("MASTER_PORT") if before is None else os.environ.__setitem__("MASTER_PORT", before)


def _symplectic_from_zero() -> None:
    """A zero matrix has no symplectic rescaling; the optimizer starts it at the identity, on W^T J W = J."""
    weight = nn.Parameter(torch.zeros(4, 4))
    optim.Symplectic([weight], lr=0.1)
    form = optim.symplectic_form(4, dtype=weight.dtype)
    assert torch.allclose(weight.T @ form @ weight, form, atol=1e-6) and weight.abs().sum() > 0


def _other_shapes_state() -> None:
    small = [nn.Parameter(torch.randn(4, 4))]
    optimizer = optim.MuonSGD(small, lr=0.1)
    small[0].grad = torch.randn(4, 4)
    optimizer.step()
    optim.MuonSGD([nn.Parameter(torch.randn(8, 4))], lr=0.1).load_state_dict(optimizer.state_dict())


def _overflowing_step(check_finite) -> None:
    """A finite gradient whose step overflows float64 (lr 1e10 × gradient 1e300): refused naming
    the weight, which is left as it was (check_finite=True), or skipped and counted ("lazy")."""
    weight = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    optimizer = optim.MuonSGD([("net.w", weight)], lr=1e10, check_finite=check_finite)
    before = weight.detach().clone()
    weight.grad = torch.full_like(weight, 1e300)
    try:
        optimizer.step()
        optimizer.raise_if_nonfinite()
    finally:
        assert torch.equal(weight, before)


def _lr_changed_to_overflow() -> None:
    """An lr a scheduler (or a user) sets after construction so large the step overflows: refused
    at the step, before any weight changes."""
    weight = nn.Parameter(torch.randn(4, 4))
    optimizer = optim.Muon([("net.w", weight)])
    optimizer.param_groups[0]["lr"] = 1e308
    before = weight.detach().clone()
    weight.grad = torch.randn(4, 4)
    try:
        optimizer.step()
    finally:
        assert torch.equal(weight, before)


def _empty_matrix_is_skipped(cls) -> None:
    """A 0 × n matrix has nothing to step: the other weights step as they would without it."""
    torch.manual_seed(0)
    empty, weight = nn.Parameter(torch.randn(0, 5)), nn.Parameter(torch.randn(8, 4))
    alone = nn.Parameter(weight.detach().clone())
    with_empty, reference = cls([("empty", empty), ("w", weight)]), cls([("w", alone)])
    empty.grad, weight.grad = torch.zeros(0, 5), torch.randn(8, 4)
    alone.grad = weight.grad.clone()
    with_empty.step()
    reference.step()
    assert torch.equal(weight, alone) and "empty" not in with_empty.constraint_report()


def _huge_gradient_steps_as_its_direction(cls) -> None:
    """A finite 1e30-scale gradient: the direction is the gradient's direction (these rules
    normalise it), so the step equals the step of the same gradient at unit scale."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 4))
    twin = nn.Parameter(weight.detach().clone())
    huge, unit = cls([weight], lr=0.05), cls([twin], lr=0.05)
    for _ in range(2):
        gradient = torch.randn(8, 4)
        weight.grad, twin.grad = gradient * 2.0**100, gradient
        huge.step()
        unit.step()
    assert torch.isfinite(weight).all() and torch.equal(weight, twin)


def test_table_is_large() -> None:
    assert len(ROWS) >= 60 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row: Row, trained: Path, tmp_path: Path) -> None:
    ctx = Context(tmp_path, trained)
    if row.error is None:
        row.run(ctx)
        return
    with pytest.raises(row.error) as info:
        row.run(ctx)
    for name in row.names:
        assert name in str(info.value), (row.id, str(info.value))
    assert not (tmp_path / "ran").exists()  # no crafted payload ever ran
