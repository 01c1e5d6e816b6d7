"""Stability thresholds: torch's own optimizers on a quadratic are stable just below them and diverge just above."""

from __future__ import annotations

import pytest
import torch

from lightning_spectral.diagnostics.stability import adam_threshold, sgd_threshold, stability_rule
from lightning_spectral.optim import Muon, MuonAdamW, MuonSGD


CASES = {"gd": dict(lr=0.1), "heavy-ball": dict(lr=0.1, momentum=0.9),
         "dampened": dict(lr=0.05, momentum=0.5, dampening=0.3), "nesterov-0.9": dict(lr=0.1, momentum=0.9, nesterov=True),
         "nesterov-0.6": dict(lr=0.2, momentum=0.6, nesterov=True),
         "weight-decay": dict(lr=0.1, momentum=0.9, weight_decay=0.5)}


def spectral_radius(sgd: dict, curvature: float) -> float:
    """The spectral radius of one torch.optim.SGD step on L = λθ²/2, a linear map of (θ, momentum buffer):
    its two columns are the step from (1, 0) and from (0, 1), two coordinates of one float64 parameter."""
    theta = torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], **sgd)
    if sgd.get("momentum"):
        optimizer.state[theta]["momentum_buffer"] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    (0.5 * curvature * theta.pow(2).sum()).backward()
    optimizer.step()
    buffer = optimizer.state[theta].get("momentum_buffer", torch.zeros(2, dtype=torch.float64))
    step = torch.stack([theta.detach(), buffer])  # column j: the image of basis vector j
    if not sgd.get("momentum"):
        step = step[:1, :1]
    return float(torch.linalg.eigvals(step).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_threshold_is_where_torchs_step_stops_being_stable(case):
    """Each threshold of the derivation, against torch's own SGD step: spectral radius 1 at it, below 1
    1 % below it, above 1 1 % above it."""
    sgd = CASES[case]
    threshold = sgd_threshold(**{"momentum": 0.0, **sgd})
    assert spectral_radius(sgd, threshold) == pytest.approx(1.0, abs=1e-12)
    assert spectral_radius(sgd, 0.99 * threshold) < 1 < spectral_radius(sgd, 1.01 * threshold)


def test_the_nesterov_threshold_is_not_the_heavy_ball_one():
    """(2 + 2β)/η, right for heavy ball, is unstable with Nesterov: its threshold is (1 + 2β) times lower."""
    assert spectral_radius(CASES["nesterov-0.9"], 0.99 * 3.8 / 0.1) > 1
    assert sgd_threshold(0.1, 0.9, nesterov=True) == pytest.approx(3.8 / 0.1 / 2.8)


def test_adams_threshold_is_the_dampened_heavy_ball_one():
    """With P frozen Adam is heavy ball with EMA momentum m ← β₁m + (1 − β₁)g on P⁻¹H: torch's SGD with
    dampening β₁, whose threshold is checked above; 38/η at β₁ = 0.9 (Cohen et al. 2022)."""
    for beta1 in (0.0, 0.5, 0.9, 0.99):
        assert adam_threshold(1e-3, beta1) == pytest.approx(sgd_threshold(1e-3, beta1, dampening=beta1))
        sgd = dict(lr=1e-3, momentum=beta1, dampening=beta1)
        if beta1:
            assert spectral_radius(sgd, adam_threshold(1e-3, beta1)) == pytest.approx(1.0, abs=1e-9)
    assert adam_threshold(1.0, 0.9) == pytest.approx(38.0)


def test_rules_of_each_optimizer_and_group():
    w, b = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    assert stability_rule(sgd, sgd.param_groups[0]).threshold == pytest.approx(38.0)
    adamw = torch.optim.AdamW([w], lr=1e-3, betas=(0.8, 0.99))
    rule = stability_rule(adamw, adamw.param_groups[0])
    assert rule.kind == "adam" and rule.threshold == pytest.approx(adam_threshold(1e-3, 0.8)) == pytest.approx(18000)
    muon = Muon([w, b], lr=0.02)
    matrix, fallback = muon.param_groups
    assert stability_rule(muon, matrix) is None  # msign: no threshold known
    assert stability_rule(muon, fallback).kind == "adam"  # the auxiliary AdamW
    budgeted = MuonSGD([w, b], lr=0.1, momentum=0.9, spectral_budget=0.1)
    assert stability_rule(budgeted, budgeted.param_groups[0]) is None
    assert stability_rule(budgeted, budgeted.param_groups[1]).threshold == pytest.approx(38.0)  # SGD fallback
    unbudgeted = MuonAdamW([w], lr=1e-3)
    assert stability_rule(unbudgeted, unbudgeted.param_groups[0]).kind == "adam"  # plain AdamW
    assert stability_rule(torch.optim.SGD([w], lr=0.0), {"lr": 0.0}) is None
