"""Bad inputs and faults: each gives a clear error naming the problem, or the correct behaviour.

First the fault tests through the real CLI (NaN injected at a given step), then one table of
bad inputs, each row asserting the error type and that the message names the problem.
"""

from __future__ import annotations

import json
import math
import textwrap
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
