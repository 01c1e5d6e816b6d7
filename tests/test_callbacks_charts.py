"""The TensorBoard layout of the diagnostics and the stability thresholds, read back from the event files."""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import SharpnessMonitor, SpectralNormMonitor, UpdateSizeMonitor
from lightning_spectral.callbacks._base import LAYOUT_CATEGORY

EPS32 = torch.finfo(torch.float32).eps
X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, :3] * 2).argmax(1)


class Tiny(pl.LightningModule):
    """One full batch (the same every step), two named parameter groups of one optimizer."""

    def __init__(self, optimizer: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        weights = [m.weight for m in self.net if isinstance(m, nn.Linear)]
        biases = [m.bias for m in self.net if isinstance(m, nn.Linear)]
        groups = [{"params": weights, "name": "weights"}, {"params": biases, "name": "biases", "weight_decay": 0.0}]
        if self.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.99))
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)

    def train_dataloader(self):
        return DataLoader(TensorDataset(X, Y), batch_size=16)


class AdamState(Callback):
    """Parameters and Adam statistics at the start of the batch after 2 steps, the sharpness callback's input."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            optimizer = trainer.optimizers[0]
            self.params = [p.detach().double().clone() for p in pl_module.parameters()]
            self.state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in pl_module.parameters()]


def fit(tmp_path, optimizer, callbacks):
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(Tiny(optimizer))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    return events


def read_layout(events) -> dict[str, list[str]]:
    """The custom-scalars layout in the event file, as ``{chart title: [tag regex, ...]}``."""
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(event.tensor_proto).item())
    (category,) = layout.category
    assert category.title == LAYOUT_CATEGORY
    return {chart.title: list(chart.multiline.tag) for chart in category.chart}


def drawn(events, regexes: list[str]) -> set[str]:
    """The scalar tags of the event file the chart's regexes draw (TensorBoard matches from the tag's start)."""
    return {tag for tag in events.Tags()["scalars"] if any(re.match(r, tag) for r in regexes)}


def test_layout_draws_each_rule_against_its_threshold_and_every_layer_on_one_chart(tmp_path):
    callbacks = [SharpnessMonitor(every_n_steps=2), SpectralNormMonitor(every_n_steps=2), UpdateSizeMonitor(every_n_steps=2)]
    events = fit(tmp_path, "sgd", callbacks)
    charts = read_layout(events)
    rule = "weights+biases"  # one SGD rule: both groups share lr, momentum and Nesterov (weight decay 0)
    assert drawn(events, charts[f"sharpness vs stability threshold: {rule}"]) == {
        "sharpness/lambda_max", f"sharpness/threshold/{rule}"}
    threshold = events.Scalars(f"sharpness/threshold/{rule}")
    assert [e.step for e in threshold] == [0, 2]
    assert threshold[0].value == pytest.approx((2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.1), rel=EPS32)  # Nesterov
    assert drawn(events, charts["spectral norm per layer"]) == {"spectral_norm/net.0", "spectral_norm/net.2"}
    assert drawn(events, charts["stable rank per layer"]) == {"stable_rank/net.0", "stable_rank/net.2"}
    assert drawn(events, charts["update spectral_to_weight per layer"]) == {
        "update/spectral_to_weight/net.0", "update/spectral_to_weight/net.2"}
    assert not any(t.startswith("sharpness/2_over_lr") for t in events.Tags()["scalars"])


def test_adam_groups_get_the_preconditioned_sharpness_against_38_over_lr(tmp_path):
    """λ_max(P⁻¹H) of the latest Adam step against the float64 eigenvalues of P^{-1/2} H P^{-1/2} at the
    captured parameters and statistics; no raw-λ_max threshold for Adam; nothing before its first step."""
    captured, tol = AdamState(), 1e-7
    events = fit(tmp_path, "adamw", [captured, SharpnessMonitor(every_n_steps=2, max_iter=1000, tol=tol)])
    rule = "weights+biases"
    assert drawn(events, read_layout(events)[f"sharpness vs stability threshold: {rule}"]) == {
        f"sharpness/preconditioned/{rule}", f"sharpness/threshold/{rule}"}
    logged = {e.step: e.value for e in events.Scalars(f"sharpness/preconditioned/{rule}")}
    assert list(logged) == [2]  # at step 0 Adam has no statistics yet
    assert events.Scalars(f"sharpness/threshold/{rule}")[-1].value == pytest.approx(38 / 0.05, rel=EPS32)

    shapes = [p.shape for p in captured.params]
    flat = torch.cat([p.reshape(-1) for p in captured.params])

    def loss(theta):
        pieces = torch.split(theta, [s.numel() for s in shapes])
        w0, b0, w2, b2 = (piece.reshape(s) for piece, s in zip(pieces, shapes))
        return F.cross_entropy(torch.tanh(X.double() @ w0.T + b0) @ w2.T + b2, Y)

    hessian = torch.func.hessian(loss)(flat)
    inverse = torch.cat([(1 / ((1 - 0.9 ** float(s["step"])) * ((s["exp_avg_sq"].double() / (1 - 0.99 ** float(s["step"])))
                                                                 .sqrt() + 1e-8))).reshape(-1) for s in captured.state])
    scale = inverse.sqrt()
    eigenvalues = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])
    top, second = float(eigenvalues[-1]), float(eigenvalues[-2])
    # power iteration stopped at relative change tol: at most tol/(1 − r²) more to go (doubled), r = λ₂/λ₁;
    # the float32 Hessian-vector products of this 43-parameter network add about 1e-5 (eps · √n · depth).
    bound = 2 * tol / (1 - (second / top) ** 2) + 1e-5
    assert logged[2] == pytest.approx(top, rel=bound)
