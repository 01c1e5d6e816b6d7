"""Second-order baselines from `pytorch-optimizer <https://github.com/kozistr/pytorch_optimizer>`_
(the ``[baselines]`` extra): :class:`SOAP` and :class:`Kron`, the same classes under this package's
names, so configs, the CLI (``--model.optimizer SOAP``) and the studies use them like any optimizer.

- ``SOAP`` (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321):
  Adam run in the eigenbasis of Shampoo's preconditioner L = E[G Gᵀ], R = E[Gᵀ G], the basis
  refreshed every ``precondition_frequency`` steps.
- ``Kron`` (Li 2018, "Preconditioner on matrix Lie group for SGD", arXiv:1809.10232; PSGD with
  Kronecker-factored preconditioners): momentum SGD preconditioned by P = QᵀQ, Q = Q₁ ⊗ Q₂ fitted
  online every 1/p steps (p = ``pre_conditioner_update_probability``, by default 1 for 500 steps,
  then decaying to 0.03), from torch-random probe vectors, with numpy-random rebalancing of the
  factors: a run resumed from a checkpoint continues from the saved state but does not repeat the
  uninterrupted run bit for bit (Lightning does not checkpoint the global RNGs).

Both call the closure they are given and keep tensors and plain values in their state: their
state dicts load with ``torch.load(weights_only=True)``. Without the extra the names exist but
building one raises an ``ImportError`` that names it; so does building ``Kron`` without opt-einsum
(``torch.backends.opt_einsum``), where torch's einsum contracts Kron's ``"an,bo,no->ab"`` pairwise in
order through a 4-D outer product (1 GB for one 128×128 matrix, 17 GB for 512×128) and exhausts memory.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BASELINES_EXTRA", "Kron", "SOAP", "baselines_available"]

BASELINES_EXTRA = "pip install 'lightning_spectral[baselines]'"

try:
    import pytorch_optimizer as _pytorch_optimizer
except ImportError:
    _pytorch_optimizer = None


def baselines_available() -> bool:
    """Whether pytorch-optimizer (the ``[baselines]`` extra) is installed."""
    return _pytorch_optimizer is not None


def _missing(name: str, why: str) -> type:
    class Missing(torch.optim.Optimizer):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            raise ImportError(f"{name}: {why}: {BASELINES_EXTRA}")

    Missing.__name__ = Missing.__qualname__ = name
    Missing.__module__ = __name__
    Missing.__doc__ = f"pytorch-optimizer's {name}; needs the [baselines] extra ({BASELINES_EXTRA})."
    return Missing


_NOT_INSTALLED = "it is pytorch-optimizer's, which is not installed"


def _kron() -> type:
    """pytorch-optimizer's Kron where torch's einsum can contract its preconditioner update
    without the 4-D intermediate (opt-einsum installed), else a class that refuses to be built."""
    if torch.backends.opt_einsum.is_available():
        return _pytorch_optimizer.Kron
    return _missing("Kron", "opt-einsum is not installed, and without it torch's einsum forms Kron's preconditioner "
                            "update as a 4-D outer product (1 GB for one 128x128 matrix) that exhausts memory")


if _pytorch_optimizer is None:
    SOAP, Kron = _missing("SOAP", _NOT_INSTALLED), _missing("Kron", _NOT_INSTALLED)
else:
    SOAP, Kron = _pytorch_optimizer.SOAP, _kron()
