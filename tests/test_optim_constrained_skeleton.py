"""The constrained skeleton (:mod:`lightning_spectral.optim.constrained.skeleton`): same-shaped
matrices stepped as one stack equal each matrix stepped alone (weights and state), and read back
to the host per stack, not per matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spectral.optim import Grassmann, L1Stiefel, ManifoldMuon, SpectralBall

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch_case(name):
    return {
        "manifold_muon": (ManifoldMuon, dict(lr=0.05, momentum=0.9, mode="amortized")),
        "manifold_muon_no_memory": (ManifoldMuon, dict(lr=0.05, mode="amortized", dual_memory=0, dual_steps=2)),
        "sphere": (SpectralBall, dict(lr=0.05, momentum=0.9, mode="amortized")),
        "ball": (SpectralBall, dict(lr=0.05, mode="amortized", constraint="ball", radius_mode="identity")),
        "grassmann": (Grassmann, dict(lr=0.05)),
        "l1_stiefel": (L1Stiefel, dict(lr=0.05, l1_weight=1e-2)),
    }[name]


@pytest.mark.parametrize("name", ["manifold_muon", "manifold_muon_no_memory", "sphere", "ball", "grassmann",
                                  "l1_stiefel"])
def test_a_stack_of_same_shaped_matrices_steps_as_each_matrix_alone(name, monkeypatch):
    """Five 12 × 5 matrices (one stack), two 5 × 12 (another) and a 7 × 3 one, against the same
    optimizer built on each parameter alone: equal weights and state (same keys, shapes, types)
    after four steps, to float32 round-off. The ball case has matrices inside the ball and on its
    boundary in the same stack; each stack is one call of the direction rule."""
    cls, kwargs = _batch_case(name)
    g = torch.Generator().manual_seed(3)
    shapes = [(12, 5)] * 5 + [(5, 12)] * 2 + [(7, 3)]
    init = [torch.randn(s, generator=g) / 3 for s in shapes]
    if name == "ball":  # radius 1: two matrices of the first stack strictly inside, the others on the boundary
        init = [w / torch.linalg.matrix_norm(w, ord=2) * (0.5 if i in (1, 3) else 1.0) for i, w in enumerate(init)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    together = [nn.Parameter(w.clone()) for w in init]
    alone = [nn.Parameter(w.clone()) for w in init]
    opt = cls(together, **kwargs)
    singles = [cls([p], **kwargs) for p in alone]
    calls = []
    direction = type(opt)._direction
    monkeypatch.setattr(type(opt), "_direction", lambda self, *a: calls.append(a[2].shape) or direction(self, *a))
    for step in range(4):
        for p, q, grad in zip(together, alone, grads[step]):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        for single in singles:
            single.step()
    batched = [s for s in calls if len(s) == 3]
    assert sorted(tuple(s) for s in batched[:2]) == [(2, 5, 12), (5, 12, 5)]
    for p, q, single in zip(together, alone, singles):
        assert torch.allclose(p, q, rtol=0, atol=2e-5), (p - q).abs().max()
        mine, ref = opt.state[p], single.state[q]
        assert mine.keys() == ref.keys()
        for key, value in ref.items():
            assert type(mine[key]) is type(value), key
            if isinstance(value, torch.Tensor):
                assert mine[key].shape == value.shape and mine[key].dtype == value.dtype, key
                assert mine[key]._base is None, key  # a copy, not a view into the stack
                assert torch.allclose(mine[key].float(), value.float(), rtol=1e-3, atol=1e-4), key
            elif isinstance(value, float):
                assert value == pytest.approx(mine[key], rel=1e-3, abs=1e-5), key
            else:
                assert mine[key] == value, key


@pytest.mark.parametrize("name", ["manifold_muon", "sphere", "ball"])
def test_the_amortized_steps_read_nothing_back_to_the_host(name, no_host_sync):
    """Once started (the first step finds the sphere's top pair by SVD), the amortized modes read
    nothing back to the host under ``check_finite="lazy"``, a stack of six same-shaped matrices and
    one matrix alone: the Stiefel Gram precision is chosen from the shape, the polar retraction's
    steps from the direction's norm bound, the sphere's top pair tracked by a fixed number of
    Lanczos steps, λ kept as a tensor."""
    cls, kwargs = _batch_case(name)
    for size in (6, 1):
        g = torch.Generator().manual_seed(5)
        params = [nn.Parameter(torch.randn(12, 5, generator=g) / 3) for _ in range(size)]
        opt = cls(params, **kwargs, check_finite="lazy")
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            before = [p.detach().clone() for p in params]
            if step == 0:
                opt.step()
                continue
            with no_host_sync():
                opt.step()
            assert all(not torch.equal(b, p) for b, p in zip(before, params))
