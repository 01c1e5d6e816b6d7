"""Checkpoints written before the constrained optimizers were rebuilt on one skeleton still load.

``tests/data/optim_<name>.pt`` (written by ``tests/data/make_optim_checkpoints.py`` with the
earlier code) holds a tiny MLP and the optimizer's ``state_dict()`` after three steps, and the
weights that code produced at the fourth step. Loaded with ``weights_only=True`` into today's
classes, the fourth step must give the same weights: same state keys, same mathematics.

ManifoldMuon's amortized direction changed algorithm on its own (a fixed-point dual step,
:func:`~lightning_spectral.optim.constrained.directions.stiefel_amortized`, replaced the gradient step on
the dual, which did not converge); its matrices are compared with that function's direction from
the loaded state (the multiplier ``dual``), so the test still proves that the state is read as
it was written. With the direction of the earlier code the two agreed exactly (checked when the
files were written).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_spectral.optim import ManifoldMuon
from lightning_spectral.optim.constrained.directions import stiefel_amortized, stiefel_direction
from lightning_spectral.optim.msign import polar_retraction

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_optim_checkpoints import CASES, HERE, take_step, tiny_groups, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# The fourth step is the same float32 arithmetic done by two versions of the code, so they may differ
# only by rounding in another summation order: about 30 products of 6 × 6 matrices per step (Newton-Schulz
# iterations, retractions, the update), each rounding an entry by at most 6·eps of the magnitudes
# involved (Higham, Accuracy and Stability of Numerical Algorithms, §3.5, γ_n). 64·eps per unit of the
# largest weight allows a few eps per stage (the largest seen: 5.4 eps, SpectralBall and BlockStiefel); a
# changed rule moves the weights by lr·|direction|, about 1e-2 here, 10^4 times more.
ROUND_OFF = 64 * torch.finfo(torch.float32).eps


def param_state_keys(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, set[str]]:
    index = {id(p): name for name, p in model.named_parameters()}
    return {index[id(p)]: set(state) for p, state in opt.state.items()}


def saved_state_keys(saved: dict) -> dict[str, set[str]]:
    ids = [i for g in saved["optimizer"]["param_groups"] for i in g["params"]]
    names = [n for g in saved["optimizer"]["param_groups"] for n in g["param_names"]]
    by_id = dict(zip(ids, names))
    return {by_id[i]: set(state) for i, state in saved["optimizer"]["state"].items()}


def manifold_muon_reference(opt: ManifoldMuon, model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """The next weights of ManifoldMuon's matrices, from the loaded state by hand."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    group = next(g for g in opt.param_groups if g["matrix"])
    out = {}
    for name, p in zip(group["param_names"], group["params"]):
        state = copy.deepcopy(opt.state[p])
        if group["mode"] == "amortized":
            Phi, _ = stiefel_amortized(p.detach(), p.grad, state)
        else:
            Phi, _, _ = stiefel_direction(p.detach(), p.grad, state["dual"], mode="inner",
                                          max_iters=group["inner_max_iters"], tol=group["inner_tol"])
        out[name] = polar_retraction(p.detach() - group["lr"] * Phi, group["retraction_tol"])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_old_checkpoint_loads_and_takes_the_same_next_step(name):
    cls, kwargs = CASES[name]
    saved = torch.load(HERE / f"optim_{name}.pt", weights_only=True)
    model = tiny_model()
    opt = cls(tiny_groups(model), **kwargs)  # built first: it projects the weights
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert param_state_keys(opt, model) == saved_state_keys(saved)
    expected = dict(saved["expected"])
    if cls is ManifoldMuon:
        expected.update(manifold_muon_reference(opt, model, saved["x"], saved["y"]))
    take_step(model, opt, saved["x"], saved["y"])
    for key, value in model.state_dict().items():
        atol = ROUND_OFF * max(1.0, expected[key].abs().max().item())
        assert torch.allclose(value, expected[key], rtol=0, atol=atol), (name, key, (value - expected[key]).abs().max())
