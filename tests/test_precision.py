"""Mixed precision with every kind of optimizer (issue 8).

``bf16-mixed``: weights and gradients stay float32, the forward runs in bfloat16; the constrained
optimizers keep their constraint (their retractions run in float32). ``16-mixed``: Lightning uses
a ``GradScaler``; on a CPU Lightning turns ``16-mixed`` into ``bf16-mixed``, so the scaler path is
tested here through Lightning's ``MixedPrecision`` plugin with a CPU ``GradScaler``. Our optimizers
accept a closure but never need one, so ``16-mixed`` works: the scaler unscales the gradients
before ``step`` and skips the step (no error, weights untouched) when they overflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_spectral.data import DigitsDataModule
from lightning_spectral.models import MLP
from lightning_spectral.module import NonFiniteStepError, SpectralModule
from lightning_spectral.optim import optimizer_entries

from conftest import OverflowAtSecondStep

# Every optimizer of the registry in its test configuration (a new entry is covered here at once).
ENTRIES = {entry.name: entry for entry in optimizer_entries()}
OPTIMIZERS = {name: (lambda groups, e=entry: e.build(groups)) for name, entry in ENTRIES.items()}
CONSTRAINED = tuple(name for name, entry in ENTRIES.items() if entry.constrained)


class PoisonedLoss(torch.nn.Module):
    """Cross-entropy, infinite at one global step (an fp16 overflow, made on purpose)."""

    def __init__(self, module: SpectralModule, step: int) -> None:
        super().__init__()
        self.module, self.step = [module], step  # a list: not a submodule

    def forward(self, logits, y):
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * math.inf if self.module[0].global_step == self.step else loss


def make_module(name: str, poison_step: int = -1) -> SpectralModule:
    module = SpectralModule(MLP(num_classes=10, in_channels=1, image_size=8, hidden_sizes=[32, 32]), 10,
                            optimizer=OPTIMIZERS[name], scheduler=None)
    module.criterion = PoisonedLoss(module, poison_step)
    module.optimizer_name = name
    return module


def _fit(tmp_path: Path, module: SpectralModule, **trainer_kwargs) -> Trainer:
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", max_steps=6, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    return trainer


def _weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _check_constraint(module: SpectralModule) -> None:
    optimizer = module.optimizers().optimizer
    if module.optimizer_name in CONSTRAINED:
        distances = [abs(v["constraint"]) for v in optimizer.constraint_report().values() if "constraint" in v]
        assert distances and max(distances) <= 1e-5, distances


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bf16_mixed_trains_and_keeps_the_constraint(tmp_path: Path, name: str) -> None:
    module = make_module(name)
    before = _weights(module)
    trainer = _fit(tmp_path, module, precision="bf16-mixed")
    assert trainer.global_step == 6
    after = _weights(module)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    _check_constraint(module)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fp16_grad_scaler_path_skips_overflowing_steps(tmp_path: Path, name: str) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module = make_module(name, poison_step=3)
    seen: dict[int, list[torch.Tensor]] = {}
    original = module.on_train_batch_end

    def record(outputs, batch, batch_idx):
        seen[batch_idx] = _weights(module)
        return original(outputs, batch, batch_idx)

    module.on_train_batch_end = record
    _fit(tmp_path, module, plugins=[plugin])
    after = _weights(module)
    assert all(torch.isfinite(p).all() for p in after)
    # the poisoned batch (index 3) left the weights as batch 2 did; the others moved them
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert any(not torch.equal(a, b) for a, b in zip(seen[3], seen[4]))
    assert scaler.get_scale() < 2.0**10  # the overflow halved the scale
    _check_constraint(module)


def test_fp16_grad_scaler_path_checks_the_weights_every_n_steps(tmp_path: Path) -> None:
    """Under the GradScaler (no check of the module's own before a step) the weights' device flag
    is read every weight_check_every steps: an overflow at step 2 stops the run at step 3 with
    weight_check_every=3, not at the end of the 45-batch epoch."""
    module = SpectralModule(MLP(num_classes=10, in_channels=1, image_size=8, hidden_sizes=[32, 32]), 10,
                            optimizer=lambda p: OverflowAtSecondStep(p, lr=0.1), scheduler=None)
    module.weight_check_every = 3
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      plugins=[plugin])
    with pytest.raises(NonFiniteStepError, match="one of the optimizer steps 1 to 3 made the weight 'net."):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 3 and trainer.num_training_batches > 40
