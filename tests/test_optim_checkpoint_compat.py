"""Checkpoints written before the constrained optimizers were rebuilt on one skeleton still load.

``tests/data/optim_<name>.pt`` (written by ``tests/data/make_optim_checkpoints.py`` with the
earlier code) holds a tiny MLP and the optimizer's ``state_dict()`` after three steps, and the
weights that code produced at the fourth step. Loaded with ``weights_only=True`` into today's
classes, the fourth step must give the same weights: same state keys, same mathematics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_spectral.optim import build_param_groups

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_optim_checkpoints import CASES, HERE, take_step, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def param_state_keys(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, set[str]]:
    index = {id(p): name for name, p in model.named_parameters()}
    return {index[id(p)]: set(state) for p, state in opt.state.items()}


def saved_state_keys(saved: dict) -> dict[str, set[str]]:
    ids = [i for g in saved["optimizer"]["param_groups"] for i in g["params"]]
    names = [n for g in saved["optimizer"]["param_groups"] for n in g["param_names"]]
    by_id = dict(zip(ids, names))
    return {by_id[i]: set(state) for i, state in saved["optimizer"]["state"].items()}


@pytest.mark.parametrize("name", list(CASES))
def test_old_checkpoint_loads_and_takes_the_same_next_step(name):
    cls, kwargs = CASES[name]
    saved = torch.load(HERE / f"optim_{name}.pt", weights_only=True)
    model = tiny_model()
    opt = cls(build_param_groups(model), **kwargs)  # built first: it projects the weights
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert param_state_keys(opt, model) == saved_state_keys(saved)
    take_step(model, opt, saved["x"], saved["y"])
    for key, value in model.state_dict().items():
        assert torch.allclose(value, saved["expected"][key], rtol=0, atol=1e-6), (name, key, (value - saved["expected"][key]).abs().max())
