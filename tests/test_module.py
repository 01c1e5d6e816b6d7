from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from lightning_spectral.data import DigitsDataModule
from lightning_spectral.models import SmallCNN
from lightning_spectral.module import CosineSchedule, LinearSchedule, SpectralModule


def make_module(**kwargs) -> SpectralModule:
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    return SpectralModule(SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=0.25), 10, **kwargs)


def make_trainer(tmp_path: Path, **kwargs) -> Trainer:
    kwargs = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "limit_train_batches": 5,
        "limit_val_batches": 2,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return Trainer(**kwargs)


class RecordingSGD(torch.optim.SGD):
    """A stand-in for a future optimizer of this package: it sees the groups and counts its steps."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_param_groups_reach_the_optimizer() -> None:
    module = make_module(
        optimizer=torch.optim.AdamW,
        scheduler=lambda opt: CosineSchedule(opt, total_steps=10),
        exclude=["fc2.*"],
        vector_weight_decay=0.0,
    )
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    matrix, vector = optimizer.param_groups
    assert (matrix["name"], matrix["matrix"], vector["name"], vector["matrix"]) == ("matrix", True, "vector", False)
    assert matrix["param_names"] == ["features.0.weight", "features.2.weight", "fc1.weight"]
    assert "fc2.weight" in vector["param_names"] and "fc1.bias" in vector["param_names"]
    assert (matrix["weight_decay"], vector["weight_decay"]) == (0.01, 0.0)  # AdamW's default vs vector_weight_decay
    assert isinstance(config["lr_scheduler"]["scheduler"], CosineSchedule)


def test_one_optimizer_step_per_batch_and_lr_logged_per_group(tmp_path: Path) -> None:
    seed_everything(0)
    module = make_module(optimizer=RecordingSGD, scheduler=lambda opt: CosineSchedule(opt, warmup_steps=2))
    trainer = make_trainer(tmp_path, logger=CSVLogger(tmp_path))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    optimizer = module.optimizers().optimizer
    scheduler = module.lr_schedulers()
    assert optimizer.steps == trainer.global_step == 10  # 2 epochs × 5 batches
    assert scheduler.total_steps == 10 and scheduler.last_epoch == 10  # horizon = estimated_stepping_batches
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["lr/matrix"]]
    assert [int(r["step"]) for r in rows] == list(range(10))
    for row in rows:  # the lr each step used: warm-up 0.05, 0.1, then cosine to 0 at step 10
        step = int(row["step"])
        expected = 0.1 * ((step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
        assert float(row["lr/matrix"]) == pytest.approx(expected) == float(row["lr/vector"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


class AccuracyRecorder(Callback):
    """Counts, per epoch, the batches' correct predictions (the model frozen: lr = 0), and reads
    ``train/acc`` at epoch end as a callback would."""

    def __init__(self) -> None:
        self.counts: list[list[int]] = []
        self.train_acc: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.counts.append([0, 0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, y = batch
        with torch.no_grad():
            self.counts[-1][0] += int((pl_module(x).argmax(1) == y).sum())
        self.counts[-1][1] += len(y)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train_acc.append(float(trainer.callback_metrics["train/acc"]))


def test_train_accuracy_is_the_epochs_and_lr_logged_on_logging_steps(tmp_path: Path) -> None:
    """``train/acc`` is the accuracy over the epoch's batches, visible to callbacks at epoch end;
    the learning rates are logged on the steps the logger writes (every ``log_every_n_steps``)
    and not paid for on the others."""
    seed_everything(0)
    module = make_module(optimizer=lambda params: torch.optim.SGD(params, lr=0.0), scheduler=None)
    recorder = AccuracyRecorder()
    trainer = make_trainer(tmp_path, logger=CSVLogger(tmp_path), log_every_n_steps=3, callbacks=[recorder],
                           limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    expected = [correct / total for correct, total in recorder.counts]
    assert len(expected) == 2 and all(total == 5 * 32 for _, total in recorder.counts)
    assert recorder.train_acc == pytest.approx(expected, abs=1e-6)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["lr/matrix"]] == [2, 5, 8]
    assert [float(r["train/acc"]) for r in rows if r["train/acc"]] == pytest.approx(expected, abs=1e-6)

    stopped = AccuracyRecorder()  # max_steps inside the first epoch: its part is logged
    trainer = make_trainer(tmp_path, logger=False, max_steps=3, callbacks=[stopped], limit_val_batches=0)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert stopped.counts[0][1] == 3 * 32
    assert stopped.train_acc == pytest.approx([stopped.counts[0][0] / (3 * 32)], abs=1e-6)


class FakeClock:
    """``time.perf_counter`` of the module, advancing 0.25 s a call."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now


def test_image_runs_log_samples_per_second_on_the_logging_steps(tmp_path: Path, monkeypatch) -> None:
    """``train/samples_per_s``, read back from the event file: the samples since the previous logged
    step over the clock's advance (one call per logged step: 0.25 s), restarted each epoch."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import lightning_spectral.module as module_file

    monkeypatch.setattr(module_file, "time", FakeClock())
    trainer = make_trainer(tmp_path, logger=TensorBoardLogger(tmp_path, name="tb"), log_every_n_steps=2,
                           limit_val_batches=0)
    trainer.fit(make_module(), DigitsDataModule(batch_size=32))
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/samples_per_s")}
    # logging steps 1, 3, 5, 7, 9; the clock starts at the first of each epoch (steps 1 and 5)
    assert logged == {3: pytest.approx(2 * 32 / 0.25), 7: pytest.approx(2 * 32 / 0.25),
                      9: pytest.approx(2 * 32 / 0.25)}


def test_user_scheduler_and_constant_lr(tmp_path: Path) -> None:
    module = make_module(scheduler=lambda opt: StepLR(opt, step_size=3, gamma=0.5))
    trainer = make_trainer(tmp_path, logger=False, enable_checkpointing=False, max_epochs=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)  # 5 steps: one halving
    constant = make_module(scheduler=None)
    assert isinstance(constant.configure_optimizers(), torch.optim.SGD)


def test_checkpoint_is_weights_only_and_resumes_optimizer_state(tmp_path: Path) -> None:
    seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, callbacks=[checkpoint])
    trainer.fit(make_module(), DigitsDataModule(batch_size=32))
    state = torch.load(checkpoint.last_model_path, weights_only=True)
    assert state["hyper_parameters"] == {"num_classes": 10, "exclude": None, "vector_weight_decay": 0.0,
                                         "head": None, "head_as_matrix": False, "embeddings_as_matrices": False,
                                         "nonfinite": "raise", "max_consecutive_skips": 10}
    assert state["spectral_module"] == {"net": "lightning_spectral.models.small_cnn.SmallCNN",
                                        "optimizer": "torch.optim.sgd.SGD", "skipped_steps": 0}
    assert state["lr_schedulers"][0]["total_steps"] == 5
    assert all("momentum_buffer" in s for s in state["optimizer_states"][0]["state"].values())

    module = make_module()
    resumed = make_trainer(tmp_path, logger=False, max_epochs=2, enable_checkpointing=False)
    resumed.fit(module, DigitsDataModule(batch_size=32), ckpt_path=checkpoint.last_model_path)
    scheduler = module.lr_schedulers()
    assert resumed.global_step == scheduler.last_epoch == 10
    assert scheduler.total_steps == 5  # the restored horizon: the decay ended with the first run


def test_cosine_schedule_factors() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = CosineSchedule(optimizer, total_steps=12, warmup_steps=4, min_lr_ratio=0.1)
    factors = [schedule.lr_factor(s) for s in (0, 3, 4, 8, 12, 20)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1, 0.1])
    open_ended = CosineSchedule(optimizer)
    assert open_ended.lr_factor(0) == 1.0
    with pytest.raises(RuntimeError, match="total_steps is unset"):
        open_ended.lr_factor(1)
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        CosineSchedule(optimizer, total_steps=4, warmup_steps=4)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        CosineSchedule(optimizer, min_lr_ratio=2.0)


def test_linear_schedule_is_polynomial_lr_over_the_trainers_horizon(tmp_path: Path) -> None:
    module = make_module(scheduler=LinearSchedule)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, logger=False)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert module.lr_schedulers().total_steps == 5  # 1 epoch x 5 batches, from the trainer
    ours, torchs = (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3) for _ in range(2))
    linear, polynomial = LinearSchedule(ours, total_steps=7), torch.optim.lr_scheduler.PolynomialLR(torchs, 7, 1.0)
    for _ in range(9):  # past the horizon both stay at 0
        assert ours.param_groups[0]["lr"] == pytest.approx(torchs.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        ours.step(), torchs.step(), linear.step(), polynomial.step()


@pytest.mark.parametrize(("scheduler", "name"), [
    (lambda opt: torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=960), "PolynomialLR(total_iters=960)"),
    (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7), "CosineAnnealingLR(T_max=7)"),
])
def test_a_stated_horizon_other_than_the_trainers_is_refused(tmp_path: Path, scheduler, name: str) -> None:
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} ends its decay at step .* trainer runs 5 optimizer steps"):
        trainer.fit(make_module(scheduler=scheduler), DigitsDataModule(batch_size=32))


def test_unbounded_training_needs_a_horizon(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, logger=False, max_epochs=-1)
    with pytest.raises(ValueError, match="max_epochs or trainer.max_steps"):
        trainer.fit(make_module(), DigitsDataModule())


def test_plateau_scheduler_is_refused() -> None:
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        make_module(scheduler=ReduceLROnPlateau).configure_optimizers()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: make_module(vector_weight_decay=-1.0), "vector_weight_decay"),
        (lambda: SpectralModule(SmallCNN(), num_classes=1), "num_classes"),
    ],
)
def test_bad_arguments_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_routing_table_is_printed_and_saved_and_the_head_takes_the_fallback_rule(tmp_path: Path, capsys) -> None:
    from lightning_spectral.optim import ManifoldMuon

    module = make_module(optimizer=lambda params: ManifoldMuon(params, lr=0.05))
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, logger=CSVLogger(tmp_path))
    trainer.fit(module, DigitsDataModule(batch_size=32))
    optimizer = module.optimizers().optimizer
    by_name = {g["name"]: g for g in optimizer.param_groups}
    head = dict(module.net.named_parameters())["fc2.weight"]
    assert any(p is head for p in by_name["head"]["params"]) and not by_name["head"]["matrix"]
    # The head stays off the Stiefel manifold: its rows are not orthonormal after training.
    rows = head.detach() @ head.detach().T
    assert (rows - torch.eye(rows.shape[0])).abs().max() > 1e-2
    saved = (Path(trainer.log_dir) / "routing.md").read_text()
    assert "fc2.weight" in saved and "| head " in saved and "features.0.weight" in saved
    assert saved.count("\n") >= len(list(module.net.parameters())) + 2  # header, rule, one row per tensor


def test_head_as_matrix_constrains_the_head_and_a_resume_with_other_routing_is_refused(tmp_path: Path) -> None:
    from lightning_spectral.module import CheckpointMismatchError
    from lightning_spectral.optim import ManifoldMuon

    build = lambda **kw: make_module(optimizer=lambda params: ManifoldMuon(params, lr=0.05), **kw)  # noqa: E731
    module = build(head_as_matrix=True)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, logger=False,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    W = module.net.fc2.weight.detach()
    assert torch.allclose(W @ W.T, torch.eye(W.shape[0]), atol=1e-4)  # 10 × 32: orthonormal rows
    resumed = make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, logger=False)
    with pytest.raises(CheckpointMismatchError, match="head_as_matrix"):
        resumed.fit(build(), DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "last.ckpt"))


class _Mesh:
    """A device mesh's names and sizes, as ``configure_model`` reads them (a real 2-D mesh needs
    two processes; the sharded fits themselves are in test_module_sharded.py)."""

    def __init__(self, **sizes: int) -> None:
        self.sizes, self.mesh_dim_names = sizes, tuple(sizes)

    def __getitem__(self, name: str) -> "_Mesh":
        return _Mesh(**{name: self.sizes[name]})

    def size(self) -> int:
        return math.prod(self.sizes.values())


def test_a_mesh_with_tensor_parallel_ranks_is_refused_by_name() -> None:
    """ModelParallelStrategy's default sizes put a node's devices on tensor parallelism (one
    data-parallel rank): FSDP2 over that would shard nothing, so configure_model refuses it and
    names the setting that shards."""
    model = make_module()
    model._device_mesh = _Mesh(data_parallel=1, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"2 tensor-parallel ranks.*data_parallel_size=<number of devices>, "
                                         r"tensor_parallel_size=1"):
        model.configure_model()
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
