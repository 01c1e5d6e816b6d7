"""UpdateSizeMonitor: per-layer step sizes against an exact SVD of the step, read back from the event files."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callbacks import UpdateSizeMonitor
from lightning_spectral.optim import Muon, MuonSGD

EPS32 = torch.finfo(torch.float32).eps
LAYERS = ("net.0", "net.2")  # Linear(6, 16): out/in = 16/6; Linear(16, 3)


class Plain(pl.LightningModule):
    """A foreign module: automatic optimization, any torch optimizer, no package hooks."""

    def __init__(self, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, generator=g)
        return DataLoader(TensorDataset(x, (x[:, :3] * 2).argmax(1)), batch_size=8)


class Weights(Callback):
    """The layers' weights (float64 copies) after each number of optimizer steps."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, trainer, pl_module):
        self.after[trainer.global_step] = {name: pl_module.get_submodule(name).weight.detach().double().clone()
                                           for name in LAYERS}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._keep(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._keep(trainer, pl_module)


def fit(model, tmp_path, monitor, **trainer_kwargs):
    weights = Weights()
    trainer_kwargs = {"max_steps": 6, **trainer_kwargs}
    trainer = pl.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[weights, monitor], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=1, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(model)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    return weights.after, events


def logged(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


def power_bound(delta: torch.Tensor, tol: float) -> float:
    """How far below ‖Δ‖₂ a power iteration stopped at relative change ``tol`` can be: the remaining
    error is the sum of the later changes, a geometric series of ratio r² = (σ₂/σ₁)², so ≤ tol/(1 − r²)
    (doubled for the pre-asymptotic rounds), plus float32 rounding."""
    s = torch.linalg.svdvals(delta)
    r2 = float(s[1] / s[0]) ** 2
    return 2 * tol / (1 - r2) + 16 * EPS32


@pytest.mark.parametrize("accumulate", [1, 2], ids=["every-batch", "accumulating"])
def test_update_sizes_match_the_svd_of_the_step_read_back_from_the_event_file(tmp_path, accumulate):
    tol = 1e-7
    after, events = fit(Plain(), tmp_path, UpdateSizeMonitor(every_n_steps=2, max_iter=500, tol=tol),
                        accumulate_grad_batches=accumulate)
    assert sorted(logged(events, "update/max/spectral_norm")) == [2, 4, 6]  # the steps that make steps 2, 4, 6
    for name in LAYERS:
        norms, rms = logged(events, f"update/spectral_norm/{name}"), logged(events, f"update/rms/{name}")
        to_weight = logged(events, f"update/spectral_to_weight/{name}")
        rms_to_weight = logged(events, f"update/rms_to_weight/{name}")
        for step in (2, 4, 6):
            before, delta = after[step - 1], after[step][name] - after[step - 1][name]
            exact = float(torch.linalg.matrix_norm(delta, ord=2))
            bound = power_bound(delta, tol)
            assert exact * (1 - bound) <= norms[step] <= exact * (1 + 16 * EPS32), (name, step)
            assert rms[step] == pytest.approx(float(delta.pow(2).mean().sqrt()), rel=16 * EPS32)
            weight_norm = float(torch.linalg.matrix_norm(before[name], ord=2))
            assert to_weight[step] == pytest.approx(exact / weight_norm,
                                                    rel=bound + power_bound(before[name], tol))
            assert rms_to_weight[step] == pytest.approx(float(delta.norm() / before[name].norm()), rel=16 * EPS32)
    assert not any(tag.startswith("update/spectral_to_promised") for tag in events.Tags()["scalars"])  # SGD: none


def promise_tolerance(before: torch.Tensor, after: torch.Tensor, delta_norm: float) -> float:
    """The step is read back as W_after − W_before of float32 weights: each stored entry is rounded by
    eps·|W_ij|, so ‖ΔW‖₂ moves by at most eps·(‖W_before‖_F + ‖W_after‖_F), relative to ‖ΔW‖₂ (doubled)."""
    return 2 * EPS32 * float(before.norm() + after.norm()) / delta_norm + 16 * EPS32


def test_muon_steps_are_lr_times_the_shape_scale(tmp_path):
    """With the exact polar factor and no weight decay Muon's step has every non-zero singular value
    lr·√max(1, out/in): the spectral ratio is 1 and the RMS ratio √(rank/min(m, n)) (the last layer's
    cross-entropy gradients sum to zero over the classes: rank 2 of 3)."""
    lr = 0.05
    model = Plain(lambda params: Muon(params, lr=lr, weight_decay=0.0, ns_schedule="svd"))
    after, events = fit(model, tmp_path, UpdateSizeMonitor(every_n_steps=3, method="svd"))
    for name, scale in zip(LAYERS, (math.sqrt(16 / 6), 1.0)):
        spectral = logged(events, f"update/spectral_to_promised/{name}")
        rms = logged(events, f"update/rms_to_promised/{name}")
        assert sorted(spectral) == [3, 6]
        for step in (3, 6):
            delta = after[step][name] - after[step - 1][name]
            rel = promise_tolerance(after[step - 1][name], after[step][name], lr * scale)
            singular = torch.linalg.svdvals(delta)
            rank = int((singular > rel * lr * scale).sum())
            assert spectral[step] == pytest.approx(1.0, rel=rel), (name, step)
            assert rms[step] == pytest.approx(math.sqrt(rank / min(delta.shape)), rel=rel), (name, step)
        assert rank == (6 if name == "net.0" else 2)


def test_budgeted_steps_stay_within_the_budget_and_reach_it_when_it_binds(tmp_path):
    budget = 2e-3  # far below the raw SGD step lr·‖momentum‖₂: the constraint binds at every step
    model = Plain(lambda params: MuonSGD(params, lr=0.1, spectral_budget=budget))
    after, events = fit(model, tmp_path, UpdateSizeMonitor(every_n_steps=2, method="svd"))
    for name in LAYERS:
        spectral = logged(events, f"update/spectral_to_promised/{name}")
        for step in (2, 4, 6):
            rel = promise_tolerance(after[step - 1][name], after[step][name], budget)
            assert spectral[step] == pytest.approx(1.0, rel=rel), (name, step)
            assert logged(events, f"update/rms_to_promised/{name}")[step] <= 1 + rel


class ManualNet(Plain):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_and_the_power_vectors_checkpoint(tmp_path):
    monitor = UpdateSizeMonitor(every_n_steps=5)
    _, events = fit(ManualNet(), tmp_path, monitor, max_epochs=1, max_steps=-1)
    assert sorted(logged(events, "update/max/rms")) == [5]  # 8 batches: the step that makes step 5
    state = monitor.state_dict()
    assert set(state["vectors"]) == {f"{n}/{kind}" for n in LAYERS for kind in ("update", "weight")}
    restored = UpdateSizeMonitor(every_n_steps=5)
    restored.load_state_dict(state)
    assert restored._last_step == 5 and all(torch.equal(v, state["vectors"][k])
                                            for k, v in restored.tracker.vectors.items())


@pytest.mark.parametrize("kwargs,match", [({"every_n_steps": 0}, "every_n_steps must be a positive int"),
                                          ({"method": "qr"}, "method must be one of"),
                                          ({"tol": 0}, "tol must be > 0"),
                                          ({"max_layers": -1}, "max_layers")])
def test_arguments_are_checked_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateSizeMonitor(**kwargs)


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral_unclamped"])
@pytest.mark.parametrize("shape", [(16, 6), (3, 16)])
def test_torch_muon_promise_is_torchs_own_adjusted_lr(adjust_lr_fn, shape):
    """For torch.optim.Muon the promise is the lr its step applies to msign(M): torch's own _adjust_lr."""
    from torch.optim._muon import _adjust_lr

    from lightning_spectral.diagnostics.update_size import promised_update_norm

    weight = nn.Parameter(torch.zeros(shape))
    optimizer = torch.optim.Muon([weight], lr=0.02, adjust_lr_fn=adjust_lr_fn)
    group = optimizer.param_groups[0]
    assert promised_update_norm(optimizer, group, weight) == pytest.approx(_adjust_lr(0.02, adjust_lr_fn, weight.shape))
