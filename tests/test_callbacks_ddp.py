"""The callbacks on 2 CPU processes (gloo, ddp_spawn): GradientNoiseScaleMonitor's DDP comm hook, rank 0's values on every rank."""

from __future__ import annotations

import math
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import GradientNoiseScaleMonitor, SpectralNormMonitor
from lightning_spectral.diagnostics import GradientNoiseScale

PER_RANK = 8


class LinReg(pl.LightningModule):
    """No `criterion` and no `loss_for_batch`: the DDP path needs no loss protocol."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(5, 2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 5, generator=g)
        return DataLoader(TensorDataset(x, x[:, :2] * 3 + torch.randn(64, 2, generator=g)), batch_size=PER_RANK)


class ReleaseProcessGroup(Callback):
    """Last in the list: destroy the gloo process group on every rank when the fit ends.

    Lightning's ddp_spawn workers exit with their gloo group alive (Lightning registers
    ``destroy_process_group`` at exit for NCCL only), so the group's worker threads, which run the
    comm hook's Python ``Future.then`` callback and hold its tensors, are torn down only during
    interpreter finalization; a gloo thread that takes the GIL then aborts the worker (SIGABRT,
    the rare teardown failure of this file; see torch's own comment in ``destroy_process_group``
    and pytorch/pytorch#179291). ``destroy_process_group`` waits for pending works and hooks and
    shuts the backend down while the interpreter is alive; the barrier first lets neither rank
    close its connections while the other still communicates. Nothing in the worker uses the
    group after the callbacks' ``teardown``.
    """

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class Checker(Callback):
    """After the monitor (list order): recompute local and averaged gradients independently and compare."""

    def __init__(self, monitor: GradientNoiseScaleMonitor):
        self.monitor = monitor
        self.reference = GradientNoiseScale(monitor.estimator.decay)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert self.monitor._recorder is not None, "the comm-hook path was not taken"
        params = list(pl_module.parameters())
        local = torch.autograd.grad(F.mse_loss(pl_module(self.batch[0]), self.batch[1]), params)
        world = trainer.world_size
        for g, p in zip(local, params):  # the hook's average is exactly DDP's default one
            expected = trainer.strategy.reduce(g / world, reduce_op="sum")
            assert torch.equal(p.grad, expected)
        local_sq = trainer.strategy.reduce(sum(g.double().pow(2).sum() for g in local), reduce_op="sum") / world
        global_sq = sum(p.grad.double().pow(2).sum() for p in params)
        self.reference.update(float(local_sq), float(global_sq), PER_RANK, PER_RANK * world)
        got, want = self.monitor.estimator.state_dict(), self.reference.state_dict()
        assert got["count"] == want["count"]
        for key in ("grad_sq", "trace"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got, want)


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
def test_gns_ddp_comm_hook_two_processes(tmp_path):
    monitor = GradientNoiseScaleMonitor(every_n_steps=2, ema_decay=0.5)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[monitor, Checker(monitor), ReleaseProcessGroup()],
        enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )
    trainer.fit(LinReg())
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = [r.split(",") for r in rows[1:] if r.split(",")[header.index("gns/b_simple")]]
    assert [int(c[header.index("step")]) for c in cells] == [0, 2]
    assert [float(c[header.index("gns/count")]) for c in cells] == [1.0, 3.0]  # updated every step, logged every 2


def test_ddp_mode_requires_ddp(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         callbacks=[GradientNoiseScaleMonitor(mode="ddp")], default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match="DistributedDataParallel"):
        trainer.fit(LinReg())


class SeesCallbackMetrics(Callback):
    """On every rank: the values rank 0 measured are in ``trainer.callback_metrics``; writes the
    epoch each rank stopped at to ``out/rank<r>``."""

    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert math.isfinite(float(trainer.callback_metrics["spectral_norm/max"]))

    def on_train_end(self, trainer, pl_module):
        norm = float(trainer.callback_metrics["spectral_norm/max"])
        (self.out / f"rank{trainer.global_rank}").write_text(f"{trainer.current_epoch} {norm}")


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
def test_rank_zero_values_reach_every_rank_for_early_stopping(tmp_path):
    """SpectralNormMonitor measures on rank 0 only; its values are broadcast so that EarlyStopping on
    every rank reads them (a missing key on rank 1 would raise) and both ranks stop together."""
    stop = EarlyStopping(monitor="spectral_norm/max", mode="min", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, logger=False,
        callbacks=[SpectralNormMonitor(every_n_steps=2), SeesCallbackMetrics(tmp_path), stop, ReleaseProcessGroup()],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(LinReg())
    ranks = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [int(epoch) for epoch, _ in ranks] == [1, 1]  # stopped by the threshold after the first epoch
    assert ranks[0][1] == ranks[1][1] and float(ranks[0][1]) > 0  # the same value on both ranks


class SeesUpdateSize(Callback):
    """Every rank writes the update size it reads from callback_metrics and the exact ‖ΔW‖₂ of its own step."""

    def __init__(self, out):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = pl_module.net.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:  # the step UpdateSizeMonitor(every_n_steps=2) measures (list order: after it)
            exact = float(torch.linalg.matrix_norm(pl_module.net.weight.detach() - self.before, ord=2))
            seen = float(trainer.callback_metrics["update/spectral_norm/net"])
            (self.out / f"rank{trainer.global_rank}").write_text(f"{seen} {exact}")


@pytest.mark.slow  # two spawned processes (≈ 20 s on a shared 2-core machine)
@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo")
def test_update_size_is_measured_on_rank_zero_and_reaches_every_rank(tmp_path):
    from lightning_spectral.callbacks import UpdateSizeMonitor

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
        callbacks=[UpdateSizeMonitor(every_n_steps=2, method="svd"), SeesUpdateSize(tmp_path),
                   ReleaseProcessGroup()],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no logger.*")
        trainer.fit(LinReg())
    (seen0, exact0), (seen1, exact1) = ([float(v) for v in (tmp_path / f"rank{r}").read_text().split()] for r in range(2))
    assert seen0 == seen1 and exact0 == exact1  # DDP keeps the weights equal; rank 0's value is broadcast
    assert seen0 == pytest.approx(exact0, rel=16 * torch.finfo(torch.float32).eps)
