"""The names training scripts import from Keller Jordan's ``muon.py`` (github.com/KellerJordan/Muon):
``MuonWithAuxAdam`` / ``SingleDeviceMuonWithAuxAdam`` and ``SingleDeviceMuon``, as :class:`~.muon.Muon`
with that file's defaults, so ``from lightning_spectral.optim import MuonWithAuxAdam`` replaces
``from muon import MuonWithAuxAdam``.

His rule, read from that file: a Muon group steps ``m ← lerp(m, g, 1 − β)``,
``u = NS₅(lerp(g, m, β))`` (Nesterov; Jordan's quintic, 5 steps, ``G/(‖G‖_F + 1e-7)``; a conv
kernel as ``out × in·k·k``), ``W ← (1 − lr·wd) W − lr·max(1, out/in)^½·u``: this package's Muon with
``adjust_lr="original"``. An Adam group steps Adam with bias corrections and decoupled decay,
``W ← (1 − lr·wd) W − lr·m̂/(√v̂ + eps)``: ``torch.optim.AdamW``'s formula, the fallback's.

Defaults (his): Muon groups ``lr=0.02, momentum=0.95, weight_decay=0``; Adam groups ``lr=3e-4,
betas=(0.9, 0.95), eps=1e-10, weight_decay=0``. Every group says its rule with ``use_muon``
(or this package's ``matrix``), and a group holding a key its rule does not take is refused, as
his asserts refuse it (naming the key here).

Differences, on purpose: the work split across DDP ranks is :class:`~.base.MatrixOptimizer`'s
(his ``MuonWithAuxAdam`` and ``SingleDeviceMuonWithAuxAdam`` are one class here, as are the
single-device and distributed cases); the Newton–Schulz runs in float32 on CPUs (``ns_dtype``;
his always runs bfloat16); a 3-D tensor (a Conv1d kernel) is one ``out × in·k`` matrix, as every
N-D tensor here, where his reshapes only 4-D ones and runs the iteration on each ``in × k`` slice;
``SingleDeviceMuon`` gives a tensor with fewer than two dimensions to
the auxiliary Adam where his fails; his distributed ``Muon`` is not here (its name is
``torch.optim.Muon``'s, which :class:`~.muon.Muon` follows).
"""

from __future__ import annotations

from typing import Any, Iterable

from .muon import Muon
from .param_groups import MATRIX_KEY, USE_MUON_KEY

__all__ = ["MuonWithAuxAdam", "SingleDeviceMuon", "SingleDeviceMuonWithAuxAdam"]

# Muon groups' and Adam groups' defaults and the keys each takes (muon.py's asserts).
MUON_GROUP = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0}
ADAM_GROUP = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.0}
# Keys this package's own group builders add (build_param_groups), which say nothing about the rule.
_BOOKKEEPING = {"params", "param_names", "name", MATRIX_KEY, USE_MUON_KEY, "opted_in"}


def _aux_adam_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The fallback arguments at his Adam groups' defaults, where not given."""
    for key, value in ADAM_GROUP.items():
        kwargs.setdefault(f"fallback_{key}", value)
    kwargs.setdefault("fallback", "adamw")
    return kwargs


class MuonWithAuxAdam(Muon):
    """``MuonWithAuxAdam(param_groups)``: groups with ``use_muon=True`` take Muon, the others Adam
    (see the module docstring). ``lr``, ``momentum``, ``weight_decay`` are the Muon groups'
    defaults and ``**kwargs`` the :class:`~.muon.Muon` keywords (``ns_dtype``, ``check_finite``,
    the fallback arguments, whose unset values are his Adam groups' defaults).

    Raises:
        ValueError: a group without ``use_muon`` (or ``matrix``), or with a key its rule does not take.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, **kwargs: Any):
        groups = []
        for index, group in enumerate(param_groups):
            if not isinstance(group, dict) or not ({USE_MUON_KEY, MATRIX_KEY} & set(group)):
                raise ValueError(f"MuonWithAuxAdam: param group {index} has no 'use_muon' key: every group says "
                                 "its rule, use_muon=True (Muon, hidden matrices) or use_muon=False (Adam: "
                                 "embeddings, the head, biases and gains)")
            muon = bool(group.get(USE_MUON_KEY, group.get(MATRIX_KEY)))
            allowed = set(MUON_GROUP if muon else ADAM_GROUP) | _BOOKKEEPING
            extra = sorted(set(group) - allowed)
            if extra:
                raise ValueError(f"MuonWithAuxAdam: param group {index} (use_muon={muon}) has keys {extra} its rule "
                                 f"does not take; a {'Muon' if muon else 'Adam'} group takes "
                                 f"{sorted(MUON_GROUP if muon else ADAM_GROUP)}")
            groups.append({**group, MATRIX_KEY: muon})
        super().__init__(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, **_aux_adam_defaults(kwargs))


SingleDeviceMuonWithAuxAdam = MuonWithAuxAdam
"""His single-device name for the same optimizer (the DDP split is automatic here)."""


class SingleDeviceMuon(Muon):
    """``SingleDeviceMuon(params, lr=0.02, weight_decay=0, momentum=0.95)``: Muon at his defaults
    (tensors with fewer than two dimensions take the auxiliary Adam at his Adam groups' defaults)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 **kwargs: Any):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, **_aux_adam_defaults(kwargs))
