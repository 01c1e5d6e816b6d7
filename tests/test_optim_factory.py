"""``create_optimizer`` routes parameters by the rules of ``build_param_groups`` (embeddings and the
output head take the fallback unless opted in)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_spectral.optim import ManifoldMuon, Muon, create_optimizer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def stiefel_distance(W):
    W = W.detach().double()
    if W.shape[0] < W.shape[1]:
        W = W.T
    k = W.shape[1]
    return float(torch.linalg.matrix_norm(W.T @ W - torch.eye(k, dtype=W.dtype)) / math.sqrt(k))


def train(net, opt, steps=10):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def test_manifold_muon_leaves_the_head_free_unless_asked():
    """Routing does not depend on the mode; the amortized one is the fast one."""
    mode = "amortized"
    net = model()
    opt = create_optimizer(net, "manifold_muon", lr=0.05, mode=mode)
    assert isinstance(opt, ManifoldMuon)
    assert [g["name"] for g in opt.param_groups] == ["matrix", "head", "vector"]
    train(net, opt)
    assert max(stiefel_distance(net[i].weight) for i in (0, 2)) <= 2e-6
    assert stiefel_distance(net[4].weight) > 1e-2  # the head moved off the manifold: AdamW took it

    net = model()
    opt = create_optimizer(net, "manifold_muon", lr=0.05, mode=mode, head_as_matrix=True)
    assert [g["name"] for g in opt.param_groups] == ["matrix", "vector"]
    train(net, opt)
    assert max(stiefel_distance(net[i].weight) for i in (0, 2, 4)) <= 2e-6


def test_options_reach_build_param_groups():
    net = model()
    opt = create_optimizer(net, "muon", lr=0.02, head=["0"], exclude=["2.*"])
    assert isinstance(opt, Muon)
    layout = {g["name"]: g["param_names"] for g in opt.param_groups}
    assert layout == {"matrix": ["4.weight"], "head": ["0.weight"],
                      "vector": ["0.bias", "2.weight", "2.bias", "4.bias"]}
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    names = [g["name"] for g in create_optimizer(emb, "muon_sgd", lr=0.1).param_groups]
    assert names == ["matrix", "embedding", "head", "vector"]
    names = [g["name"] for g in create_optimizer(emb, "muon_sgd", lr=0.1, embeddings_as_matrices=True).param_groups]
    assert names == ["matrix", "head", "vector"]


@pytest.mark.parametrize("given", ["generator", "named", "groups", "class name"])
def test_parameters_named_parameters_and_groups_as_timm_create_optimizer_v2_takes(given):
    """Whatever an optimizer takes, create_optimizer takes (a generator is consumed once): the
    optimizer equals one built on the same input directly."""
    net = model()
    inputs = {
        "generator": lambda: net.parameters(),
        "named": lambda: net.named_parameters(),
        "groups": lambda: [{"params": [net[0].weight, net[2].weight], "matrix": True},
                           {"params": [net[4].weight, net[0].bias, net[2].bias, net[4].bias], "matrix": False,
                            "weight_decay": 0.0}],
        "class name": lambda: net.parameters(),
    }[given]
    opt = create_optimizer(inputs(), "Muon" if given == "class name" else "muon", lr=0.02, weight_decay=0.01)
    direct = Muon(inputs(), lr=0.02, momentum=0.9, weight_decay=0.01)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in direct.param_groups]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in direct.param_groups]
    with pytest.raises(ValueError, match="head_as_matrix route a model's modules"):
        create_optimizer(inputs(), "muon", head_as_matrix=True)
