"""Keller Jordan's ``MuonWithAuxAdam`` / ``SingleDeviceMuon`` names against a faithful float32 reading
of his ``muon.py`` (github.com/KellerJordan/Muon), run beside ours on the same weights and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spectral.optim import MuonWithAuxAdam, SingleDeviceMuon, SingleDeviceMuonWithAuxAdam


def zeropower_via_newtonschulz5(G, steps):
    """His routine, in float32 (his casts to bfloat16: the one change)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.float()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def muon_update(grad, momentum, beta=0.95, ns_steps=5, nesterov=True):
    momentum.lerp_(grad, 1 - beta)
    update = grad.lerp_(momentum, beta) if nesterov else momentum
    if update.ndim == 4:
        update = update.view(len(update), -1)
    update = zeropower_via_newtonschulz5(update, steps=ns_steps)
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    return update


def adam_update(grad, buf1, buf2, step, betas, eps):
    buf1.lerp_(grad, 1 - betas[0])
    buf2.lerp_(grad.square(), 1 - betas[1])
    buf1c = buf1 / (1 - betas[0] ** step)
    buf2c = buf2 / (1 - betas[1] ** step)
    return buf1c / (buf2c.sqrt() + eps)


class ReferenceMuonWithAuxAdam(torch.optim.Optimizer):
    """His SingleDeviceMuonWithAuxAdam: the same defaults, asserts and steps."""

    def __init__(self, param_groups):
        for group in param_groups:
            assert "use_muon" in group
            if group["use_muon"]:
                group["lr"] = group.get("lr", 0.02)
                group["momentum"] = group.get("momentum", 0.95)
                group["weight_decay"] = group.get("weight_decay", 0)
                assert set(group.keys()) == {"params", "lr", "momentum", "weight_decay", "use_muon"}
            else:
                group["lr"] = group.get("lr", 3e-4)
                group["betas"] = group.get("betas", (0.9, 0.95))
                group["eps"] = group.get("eps", 1e-10)
                group["weight_decay"] = group.get("weight_decay", 0)
                assert set(group.keys()) == {"params", "lr", "betas", "eps", "weight_decay", "use_muon"}
        super().__init__(param_groups, dict())

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if group["use_muon"]:
                    if len(state) == 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    update = muon_update(p.grad, state["momentum_buffer"], beta=group["momentum"])
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.reshape(p.shape), alpha=-group["lr"])
                else:
                    if len(state) == 0:
                        state["exp_avg"], state["exp_avg_sq"], state["step"] = torch.zeros_like(p), torch.zeros_like(p), 0
                    state["step"] += 1
                    update = adam_update(p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"],
                                         group["eps"])
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 16), nn.Linear(16, 24), nn.Conv2d(24, 8, 3), nn.Linear(8, 5))


def _groups(model, **muon_keys):
    hidden = [model[1].weight, model[2].weight]
    adam = [model[0].weight, model[3].weight, model[1].bias, model[2].bias, model[3].bias]
    return [dict(params=hidden, use_muon=True, **muon_keys), dict(params=adam, use_muon=False, lr=1e-3)]


@pytest.mark.parametrize("muon_keys", [{}, dict(lr=0.05, weight_decay=0.01, momentum=0.9)])
def test_steps_equal_his_on_the_same_groups(muon_keys):
    ours_model, ref_model = _model(), _model()
    ours = MuonWithAuxAdam(_groups(ours_model, **muon_keys), ns_dtype="float32")
    reference = ReferenceMuonWithAuxAdam(_groups(ref_model, **muon_keys))
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in ref_model.parameters()]
        for model in (ours_model, ref_model):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
        ours.step()
        reference.step()
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert not torch.equal(p, _model().state_dict()[name])  # it moved
        torch.testing.assert_close(p.detach(), q.detach(), msg=name)  # float32's default tolerance
    assert SingleDeviceMuonWithAuxAdam is MuonWithAuxAdam


def test_his_defaults_and_refusals():
    model = _model()
    opt = MuonWithAuxAdam(_groups(model))
    muon, adam = opt.param_groups
    assert (muon["lr"], muon["momentum"], muon["weight_decay"], muon["nesterov"]) == (0.02, 0.95, 0.0, True)
    assert (adam["lr"], adam["betas"], adam["eps"], adam["weight_decay"]) == (1e-3, (0.9, 0.95), 1e-10, 0.0)
    with pytest.raises(ValueError, match="param group 0 has no 'use_muon' key"):
        MuonWithAuxAdam([dict(params=[model[1].weight])])
    with pytest.raises(ValueError, match=r"param group 0 \(use_muon=True\) has keys \['betas'\]"):
        MuonWithAuxAdam([dict(params=[model[1].weight], use_muon=True, betas=(0.9, 0.9))])
    with pytest.raises(ValueError, match="use_muon=True but parameter #0 has shape"):
        MuonWithAuxAdam([dict(params=[model[1].bias], use_muon=True)])


def test_single_device_muon_is_muon_at_his_defaults():
    model = _model()
    opt = SingleDeviceMuon([model[1].weight, model[1].bias])
    muon, vectors = opt.param_groups
    assert (muon["lr"], muon["momentum"], muon["weight_decay"]) == (0.02, 0.95, 0.0)
    assert (vectors["lr"], vectors["betas"], vectors["eps"], vectors["weight_decay"]) == (3e-4, (0.9, 0.95), 1e-10, 0.0)
    hidden, ref_model = _model(), _model()
    ours = SingleDeviceMuon([hidden[1].weight], lr=0.05, ns_dtype="float32")
    reference = ReferenceMuonWithAuxAdam([dict(params=[ref_model[1].weight], use_muon=True, lr=0.05)])
    for _ in range(3):
        grad = torch.randn(24, 16)
        hidden[1].weight.grad, ref_model[1].weight.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(hidden[1].weight.detach(), ref_model[1].weight.detach())
