"""When splitting a batch of matrices across the ranks pays: a latency model of the step.

Under DDP every rank has the same gradients, so a batch of ``k`` same-shaped ``m × n`` matrices
can be orthogonalised on every rank (repeated) or each by one owner, whose new weights then
reach the others in the step's one all-gather (:mod:`.distributed`). With ``w`` ranks,
``b`` bytes per element and the Newton–Schulz cost ``f = steps·(4s²l + 2s³)`` FLOPs per matrix
(``s ≤ l`` its sides; Jordan et al. 2024, "Muon"), the model

    collective:  t = α + β·(bytes this rank sends)        (an all-gather sends (w−1)·its share)
    msign batch: t = γ + k·f / R                          (one stacked call)

gives per batch the time the split saves on each rank and the time its weights add to the wire:

    saved = γ·(1 − min(1, k/w)) + (1 − 1/w)·k·f/R,        sent = β·(w − 1)/w·k·m·n·b

(the owners deal the matrices evenly, :func:`~.distributed.deal`). A batch is split where
``saved > sent``; the step's all-gather latency ``α`` is paid once, so where the split batches
together save no more than ``α`` nothing is split. Per element, the bandwidth test reads
``f/(m·n) > β·b·R``: a matrix is worth sending when its short side exceeds
``β·b·R/(6·steps)`` if square, ``β·b·R/(4·steps)`` if long and thin (the crossover). The other matrix rules (constrained directions,
retractions) cost at least one msign, so a batch the model splits for msign pays for them too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["LatencyModel", "line_fit", "ns_flops"]


def ns_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Newton–Schulz FLOPs of one msign of the ``rows × rest`` matrix view of ``shape``:
    ``steps·(4s²l + 2s³)``, ``s ≤ l`` the sides (three GEMMs per step)."""
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    s, l = min(rows, cols), max(rows, cols)
    return steps * (4 * s * s * l + 2 * s**3)


def _itemsize(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class LatencyModel:
    """``α + β·bytes`` for a collective, ``γ + FLOPs/R`` for a stacked msign (module docstring).
    Set ``optimizer.distribute_work`` to one to split only the batches it says pay."""

    alpha_s: float
    beta_s_per_byte: float
    gamma_s: float
    flop_rate: float
    steps: int = 5

    def __post_init__(self):
        for name in ("alpha_s", "beta_s_per_byte", "gamma_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LatencyModel.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not self.flop_rate > 0 or self.flop_rate == float("inf"):
            raise ValueError(f"LatencyModel.flop_rate must be a finite FLOP/s > 0, got {self.flop_rate}")

    def msign_s(self, k: int, shape: Sequence[int]) -> float:
        """Model time of one stacked msign of ``k`` matrices of ``shape`` (0 for none)."""
        return self.gamma_s + k * ns_flops(shape, self.steps) / self.flop_rate if k else 0.0

    def gain_s(self, k: int, shape: Sequence[int], dtype: str | torch.dtype, world: int) -> float:
        """Time per rank the split of ``k`` matrices of ``shape`` saves, less what their weights
        add to the all-gather (negative: repeating them is faster)."""
        saved = self.gamma_s * (1 - min(1.0, k / world)) + (1 - 1 / world) * k * ns_flops(shape, self.steps) / self.flop_rate
        numel = 1
        for d in shape:
            numel *= d
        return saved - self.beta_s_per_byte * (world - 1) / world * k * numel * _itemsize(dtype)

    def choose(self, keys: Sequence[tuple], world: int) -> dict[tuple, bool]:
        """Per ``(shape, dtype, device)`` key (one batch: its count in ``keys``), whether to split
        it: its gain is positive, and the split batches together gain more than one ``α``."""
        counts: dict[tuple, int] = {}
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        gains = {key: self.gain_s(k, key[0], key[1], world) for key, k in counts.items()}
        total = sum(g for g in gains.values() if g > 0)
        return {key: world > 1 and g > 0 and total > self.alpha_s for key, g in gains.items()}

    def crossover(self, dtype: str | torch.dtype = torch.float32) -> float:
        """The short side above which a square matrix's split pays its bytes (``γ``, ``α`` aside)."""
        return self.beta_s_per_byte * _itemsize(dtype) * self.flop_rate / (6 * self.steps)

    @classmethod
    def fit(cls, collectives: Sequence[tuple[float, float]], msigns: Sequence[tuple[float, float]],
            steps: int = 5) -> "LatencyModel":
        """Least squares of ``(bytes sent, seconds)`` and ``(FLOPs, seconds)`` samples (at least
        two distinct sizes each); intercepts and slopes clipped at 0."""
        (alpha, beta), (gamma, per_flop) = line_fit(collectives, "collective"), line_fit(msigns, "msign")
        if per_flop <= 0:
            raise ValueError("the msign samples do not grow with their FLOPs: time larger matrices")
        return cls(alpha, beta, gamma, 1 / per_flop, steps)

    @classmethod
    def measure(cls, device: Optional[torch.device] = None, group=None, repeats: int = 9,
                sizes: Sequence[int] = (16, 64, 128, 256), elements: Sequence[int] = (1, 2**14, 2**17, 2**19),
                dtype: torch.dtype = torch.float32, steps: int = 5) -> "LatencyModel":
        """Time ``all_gather_into_tensor`` of ``elements`` per rank (each call after an msign, so
        that the ranks' drift and waiting count, as in a step) and msign of ``sizes × sizes``
        matrices here (medians of ``repeats``), fit, and take every constant's largest value over
        the ranks, so that every rank makes the same choice. Collective: every rank calls it."""
        from .msign import msign

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("LatencyModel.measure times collectives: initialise torch.distributed first")
        device = torch.device("cpu") if device is None else torch.device(device)
        world = dist.get_world_size(group)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def median_s(fn) -> float:
            fn()
            sync()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        g = torch.Generator(device=device).manual_seed(0)
        work = torch.randn(sizes[-1], sizes[-1], generator=g, device=device, dtype=dtype)
        collectives = []
        for n in elements:
            inp = torch.zeros(n, dtype=dtype, device=device)
            out = torch.empty(world * n, dtype=dtype, device=device)
            dist.barrier(group)
            times = []
            for _ in range(repeats + 1):  # each after an msign, as in a step: the ranks arrive apart
                msign(work, steps)
                sync()
                start = time.perf_counter()
                dist.all_gather_into_tensor(out, inp, group=group)
                sync()
                times.append(time.perf_counter() - start)
            collectives.append(((world - 1) * n * inp.element_size(), statistics.median(times[1:])))
        msigns = [(ns_flops((m, m), steps), median_s(lambda X=torch.randn(m, m, generator=g, device=device, dtype=dtype):
                                                    msign(X, steps))) for m in sizes]
        local = cls.fit(collectives, msigns, steps)
        values = torch.tensor([local.alpha_s, local.beta_s_per_byte, local.gamma_s, 1 / local.flop_rate],
                              dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        alpha, beta, gamma, per_flop = values.tolist()
        return cls(alpha, beta, gamma, 1 / per_flop, steps)


def line_fit(samples: Sequence[tuple[float, float]], what: str = "latency") -> tuple[float, float]:
    """Intercept and slope of ``(x, y)`` samples: the least-squares slope, and the intercept
    through the smallest sample (where the latency dominates; a least-squares intercept is an
    extrapolation from the large sizes, noise included), each clipped at 0."""
    xs = [float(x) for x, _ in samples]
    if len(set(xs)) < 2:
        raise ValueError(f"fitting the {what} latency needs samples at two sizes or more, got sizes {sorted(set(xs))}")
    ys = [float(y) for _, y in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 0.0)
    x0, y0 = min(zip(xs, ys))
    return max(y0 - slope * x0, 0.0), slope
