"""The one-call research API, called with the argument lists of the original experiment code:
``get_model``, ``create_optimizer``, ``compute_spectral_norms``, ``estimate_sharpness(..., epsilon=)``,
``estimate_gradient_noise_scale``, ``MetricsLogger`` and ``lr_stability_scan``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_spectral.diagnostics import (
    MetricsLogger,
    compute_spectral_norms,
    estimate_gradient_noise_scale,
    estimate_sam_sharpness,
    estimate_sharpness,
    lr_stability_scan,
)
from lightning_spectral.models import MODEL_REGISTRY, get_model
from lightning_spectral.optim import MuonSGD, SpectralClipSolver, create_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")


def ce_loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def cifar_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", ["small_cnn", "mlp"])
def test_get_model_with_the_experiment_arguments(name):
    model = get_model(name, num_classes=10, width_mult=1.0)
    assert model(cifar_batch(2)[0]).shape == (2, 10)  # CIFAR-10 shaped by default
    assert {"small_cnn", "resnet18", "mlp"} <= set(MODEL_REGISTRY)
    with pytest.raises(ValueError, match=r"unknown model 'tiny_vit'; choose one of \["):
        get_model("tiny_vit", num_classes=10, width_mult=1.0)


# The (optimizer_type, inner_solver_type) pairs of the original experiments.
CONFIGS = [("sgd", "none"), ("muon_sgd", "spectral_clip"), ("muon_sgd", "dual_ascent"), ("muon_sgd", "quasi_newton"),
           pytest.param("muon_sgd", "frank_wolfe", marks=pytest.mark.slow),  # ~15 s a step on a 64 × 3072 matrix
           ("muon_sgd", "admm")]


@pytest.mark.parametrize("optimizer_type, inner_solver_type", CONFIGS)
def test_create_optimizer_with_the_experiment_arguments(optimizer_type, inner_solver_type):
    torch.manual_seed(0)
    model = get_model("mlp", num_classes=10, width_mult=0.25)
    spectral_budget = 0.1
    optimizer = create_optimizer(
        model,
        optimizer_type=optimizer_type,
        inner_solver_type=inner_solver_type,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        spectral_budget=spectral_budget if inner_solver_type != "none" else None,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    x, y = cifar_batch(16)
    before = ce_loss_fn(model, x, y).item()
    for _ in range(3):
        optimizer.zero_grad()
        ce_loss_fn(model, x, y).backward()
        optimizer.step()
        scheduler.step()
    assert ce_loss_fn(model, x, y).item() < before
    if optimizer_type == "muon_sgd":  # the budget bounds the hidden matrices' steps; the head takes SGD
        assert isinstance(optimizer, MuonSGD)
        names = {g["name"]: g for g in optimizer.param_groups}
        assert names["matrix"]["spectral_budget"] == pytest.approx(spectral_budget)
        assert names["head"]["matrix"] is False and names["head"]["algorithm"] == "sgd"


def test_compute_spectral_norms_with_max_layers():
    model = get_model("small_cnn", num_classes=10, width_mult=0.5)
    norms = compute_spectral_norms(model, max_layers=8)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert list(norms) == layers[:8]
    for name, module in model.named_modules():
        if name in norms:
            exact = torch.linalg.svdvals(module.weight.detach().reshape(module.weight.shape[0], -1))[0]
            assert norms[name] == pytest.approx(float(exact), rel=1e-5)
    assert max(norms.values()) > 0


def test_estimate_sharpness_with_epsilon_is_the_finite_difference_proxy():
    """``epsilon=`` asks for L(θ + ε g/‖g‖) − L(θ), checked by hand; the weights are restored."""
    torch.manual_seed(0)
    model = get_model("mlp", num_classes=10, width_mult=0.25)
    x, y = cifar_batch(16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    value = estimate_sharpness(model, ce_loss_fn, x, y, epsilon=1e-3)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    loss = ce_loss_fn(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(g, alpha=1e-3 / float(norm))
        expected = float(ce_loss_fn(model, x, y) - loss)
    assert value == pytest.approx(expected, rel=1e-4)
    assert value == pytest.approx(1e-3 * float(norm), rel=0.05)  # first order: ε‖g‖
    model.load_state_dict(state)
    sign = estimate_sharpness(model, ce_loss_fn, x, y, epsilon=1e-3, normalize=False)
    assert sign == estimate_sam_sharpness(model, ce_loss_fn, x, y, 1e-3, normalize=False) and sign > value
    with pytest.raises(TypeError, match="estimate_sam_sharpness"):
        estimate_sharpness(model, ce_loss_fn, x, y, method="lanczos", epsilon=1e-3)


def test_estimate_gradient_noise_scale_with_two_batches():
    """Two equal batches give B_simple = tr Σ / ‖G‖² from the unbiased estimates at b and 2b."""
    torch.manual_seed(0)
    model = get_model("mlp", num_classes=10, width_mult=0.25)
    batches = [cifar_batch(8, seed=1), cifar_batch(8, seed=2)]
    value = estimate_gradient_noise_scale(model, ce_loss_fn, batches[0], batches[1])
    model.eval()
    g1, g2 = (torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce_loss_fn(model, *b), list(model.parameters()))])
              for b in batches)
    small = (g1.double().pow(2).sum() + g2.double().pow(2).sum()) / 2
    big = ((g1.double() + g2.double()) / 2).pow(2).sum()
    grad_sq = (16 * big - 8 * small) / 8
    trace = (small - big) / (1 / 8 - 1 / 16)
    expected = float(trace / grad_sq) if grad_sq > 0 else math.nan
    assert value == pytest.approx(expected, rel=1e-6, nan_ok=True)


def test_metrics_logger_as_used_per_epoch(tmp_path):
    logger = MetricsLogger()
    for epoch in (1, 2):
        logger.log({"epoch": epoch, "train_loss": 1.0 / epoch, "val_acc": 0.5 + 0.1 * epoch, "lr": 0.1})
    assert [h["epoch"] for h in logger.history] == [1, 2] and logger.history[-1]["val_acc"] == pytest.approx(0.7)
    logger.save_json(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == logger.history
    logger.save_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "epoch,train_loss,val_acc,lr"
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs pandas.*history"):
            logger.to_dataframe()
    else:
        assert list(logger.to_dataframe()["epoch"]) == [1, 2]


def test_lr_stability_scan_with_the_experiment_arguments():
    data = [cifar_batch(8, seed=s) for s in range(2)]

    def model_factory():
        return get_model("mlp", num_classes=10, width_mult=0.125)

    def muon_factory(model, lr):
        return MuonSGD(model.parameters(), lr=lr, momentum=0.9, spectral_budget=0.1, inner_solver=SpectralClipSolver())

    result = lr_stability_scan(model_factory, muon_factory, ce_loss_fn, data, lr_range=(1e-3, 2.0), num_lrs=3,
                               steps_per_lr=3, device=torch.device("cpu"))
    assert set(result) >= {"lr_values", "final_losses", "converged", "max_stable_lr"}
    assert result["lr_values"] == pytest.approx([1e-3, math.sqrt(2e-3), 2.0])
