"""What every direction solve reports (:class:`DirectionInfo`): the dual iterations it took, the
constraint residual it stopped at and, when certified, the weak-duality pair ``⟨G, Φ⟩ ≤`` dual value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DirectionInfo:
    """What a direction solve did: dual iterations (evaluations: an msign, or a ``k × k``
    eigensolve in the Stiefel Gram-space solves), the constraint residual of the iterate it
    stopped at, and, when certified, primal objective and dual value."""

    iterations: int
    residual: torch.Tensor
    objective: Optional[float] = None
    dual_value: Optional[float] = None

    @property
    def duality_gap(self) -> float:
        """``(dual − primal) / dual`` ≥ 0 up to round-off; needs ``certify=True``."""
        if self.objective is None or self.dual_value is None:
            raise ValueError("duality_gap needs a certified solve (certify=True)")
        return (self.dual_value - self.objective) / max(abs(self.dual_value), 1e-30)
