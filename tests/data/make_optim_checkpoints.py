"""Write the optimizer checkpoints that ``tests/test_optim_checkpoint_compat.py`` loads.

Run once with the code whose checkpoints must keep loading (it was run before the constraint
optimizers were rebuilt on one skeleton): for each of the nine constrained optimizers it builds
the optimizer on a tiny MLP (6×4 tall, 6×6 square, 4×6 wide and three biases, so every optimizer
has matrices it keeps on its set and, for most, matrices it leaves to the fallback rule), takes
three steps, saves the model and ``optimizer.state_dict()``, then takes a fourth step and saves the
weights it produced. ``python tests/data/make_optim_checkpoints.py [name ...]`` rewrites the files.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from lightning_spectral.optim import (
    BlockStiefel,
    DoublyStochastic,
    Grassmann,
    L1Stiefel,
    ManifoldMuon,
    Oblique,
    SLMuon,
    SpectralBall,
    Symplectic,
)

HERE = Path(__file__).parent
# name -> (class, constructor keyword arguments)
CASES = {
    "manifold_muon": (ManifoldMuon, dict(lr=0.05)),
    "manifold_muon_inner": (ManifoldMuon, dict(lr=0.05, mode="inner")),
    "spectral_ball": (SpectralBall, dict(lr=0.05)),
    "oblique": (Oblique, {}),
    "sl_muon": (SLMuon, dict(lr=0.02)),
    "symplectic": (Symplectic, dict(lr=0.02)),
    "l1_stiefel": (L1Stiefel, dict(l1_weight=1e-3)),
    "block_stiefel": (BlockStiefel, dict(block_size=3, unsupported="fallback")),
    "doubly_stochastic": (DoublyStochastic, {}),
    "grassmann": (Grassmann, {}),
}


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))


def tiny_groups(model: nn.Module) -> list[dict]:
    """The weights in one matrix group, the biases in a fallback group (spelled out, so the layout
    does not depend on how ``build_param_groups`` picks a model's matrices)."""
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if p.ndim >= 2]
    biases = [(n, p) for n, p in named if p.ndim < 2]
    return [dict(params=[p for _, p in weights], param_names=[n for n, _ in weights], name="matrix", matrix=True),
            dict(params=[p for _, p in biases], param_names=[n for n, _ in biases], name="vector", matrix=False,
                 weight_decay=0.0)]


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)


def take_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    x, y = tiny_data()
    for name in names or CASES:
        cls, kwargs = CASES[name]
        model = tiny_model()
        opt = cls(tiny_groups(model), **kwargs)
        for _ in range(3):
            take_step(model, opt, x, y)
        # deep copies: the fourth step updates the state tensors in place
        saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(), "x": x, "y": y})
        take_step(model, opt, x, y)
        saved["expected"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(saved, HERE / f"optim_{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
