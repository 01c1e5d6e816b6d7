"""SOAP and PSGD Kron (pytorch-optimizer, the [baselines] extra): from the CLI and YAML like any
optimizer, checkpoints that load with weights_only=True and resume, and a clear error without the extra."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_spectral.optim import OPTIMIZERS, baselines_available, create_optimizer
from lightning_spectral.optim.baselines import _NOT_INSTALLED, BASELINES_EXTRA, _kron, _missing

ROOT = Path(__file__).resolve().parents[1]
needs_extra = pytest.mark.skipif(not baselines_available(),
                                 reason=f"pytorch-optimizer (the [baselines] extra) is not installed: {BASELINES_EXTRA}")
BASELINES = ["soap", "kron"]


def test_without_the_extra_building_one_names_it() -> None:
    with pytest.raises(ImportError, match=r"SOAP: it is pytorch-optimizer's, which is not installed: pip install "
                                          r"'lightning_spectral\[baselines\]'"):
        _missing("SOAP", _NOT_INSTALLED)([nn.Parameter(torch.zeros(2, 2))], lr=1e-3)


@needs_extra
def test_kron_without_opt_einsum_is_refused_before_it_exhausts_memory(monkeypatch) -> None:
    """Without opt-einsum torch's einsum builds Kron's update through a 4-D outer product (GBs for
    one 128x128 matrix): building Kron is refused, naming opt-einsum; with it, Kron is
    pytorch-optimizer's own class."""
    import pytorch_optimizer

    assert _kron() is pytorch_optimizer.Kron
    monkeypatch.setattr(torch.backends.opt_einsum, "is_available", lambda: False)
    with pytest.raises(ImportError, match=r"Kron: opt-einsum is not installed.*4-D outer product.*\[baselines\]"):
        _kron()([nn.Parameter(torch.zeros(128, 128))], lr=1e-3)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    x, y = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return [float(opt.step(closure)) for _ in range(n)]


@needs_extra
@pytest.mark.parametrize("name", BASELINES)
def test_state_dict_loads_with_weights_only_and_continues_identically(name: str) -> None:
    """4 steps, a state dict through torch.save/torch.load(weights_only=True), 4 more: the same
    losses as 8 uninterrupted steps (the global RNG Kron draws from is put back as it was)."""
    kwargs = dict(OPTIMIZERS[name].test_kwargs)
    model = _mlp()
    opt = create_optimizer(model, name, **kwargs)
    losses = _steps(model, opt, 4)
    assert losses[-1] < losses[0]  # it trains
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    rng = torch.get_rng_state(), np.random.get_state()
    uninterrupted = _steps(model, opt, 4)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    model2 = _mlp()
    model2.load_state_dict(checkpoint["model"])
    opt2 = create_optimizer(model2, name, **kwargs)
    opt2.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    assert _steps(model2, opt2, 4) == uninterrupted


@needs_extra
@pytest.mark.parametrize("name", ["soap", pytest.param("kron", marks=pytest.mark.slow)])  # Kron: 16 s here
def test_cli_trains_and_resumes_from_a_checkpoint(name: str, run_cli, tmp_path: Path) -> None:
    """The YAML overlay and the short class name both build it; 3 steps, then --ckpt_path to 5:
    the resumed optimizer's step counter goes on from the checkpoint's (a fresh one would be at 2).
    On the digits MLP: pytorch-optimizer 4.1's Kron took 68 s and 4 GB for one step of the quick
    start's 64x32x3x3 conv kernel."""
    quick = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.callbacks=[]",
             "--model.net", "lightning_spectral.models.MLP", "--model.net.init_args.width_mult=0.25",
             "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]
    cls = OPTIMIZERS[name].cls.__name__
    first = run_cli("fit", *quick, "--config", str(ROOT / "configs" / "optim" / f"{name}.yaml"),
                    "--trainer.max_steps=3")
    assert type(first.model.optimizers().optimizer).__name__ == cls and first.trainer.global_step == 3
    (ckpt,) = (tmp_path / "logs").rglob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    saved = checkpoint["optimizer_states"][0]
    resumed = run_cli("fit", *quick, "--model.optimizer", cls, "--model.optimizer.lr", "1e-3",
                      "--trainer.max_steps=5", "--ckpt_path", str(ckpt))
    opt = resumed.model.optimizers().optimizer
    assert type(opt).__name__ == cls and resumed.trainer.global_step == 5
    assert [g["step"] for g in opt.param_groups] == [g["step"] + 2 for g in saved["param_groups"]]
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
