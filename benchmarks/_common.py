"""Shared pieces of the benchmark: parameter shapes, gradients with a power-law spectrum,
the float32 Newton–Schulz floor, interleaved timing and Markdown formatting."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

Shape = tuple[int, int]


def model_shapes(name: str, quick: bool = False) -> list[Shape]:
    """``out × in·kh·kw`` of every ≥2-D parameter of the model (conv kernels flattened).

    ``"gpt"`` is the GPT 4×256 (four heads), its blocks' matrices only (24: q, k, v, o, fc, proj).
    ``quick`` shrinks the widths (the GPT to 2×32, ResNet-18 at ``width_mult=1/16``, the MLP on 8×8 inputs with
    width 1/8) so the smoke test runs in seconds; the shapes keep their aspect ratios."""
    from lightning_spectral.models import GPT, MLP, ResNet18

    if name == "gpt":  # the blocks' matrices (the embedding and the tied head take the fallback)
        model = GPT(n_layer=2, n_embd=32, n_head=4, block_size=16) if quick else GPT(n_layer=4, n_embd=256, n_head=4)
        return [tuple(p.shape) for name, p in model.named_parameters() if name.startswith("blocks.") and p.ndim >= 2]
    if name == "resnet18":
        model = ResNet18(width_mult=1 / 16 if quick else 1.0)
    elif name == "mlp":
        model = MLP(image_size=8 if quick else 32, width_mult=1 / 8 if quick else 1.0)
    else:
        raise ValueError(name)
    return [(p.shape[0], p[0].numel()) for p in model.parameters() if p.ndim >= 2]


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).float()


def with_spectrum(n: int, m: int, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random ``n × m`` matrix with the given singular values (random singular vectors)."""
    k = min(n, m)
    U, V = random_orthonormal(n, k, generator), random_orthonormal(m, k, generator)
    return (U * sigma[:k].float()) @ V.mT


def power_law(n: int, m: int, generator: torch.Generator, exponent: float = 1.0) -> torch.Tensor:
    """Gradient-like matrix: ``σᵢ = i^(−exponent)`` (σ₁ = 1), random singular vectors."""
    k = min(n, m)
    return with_spectrum(n, m, torch.arange(1, k + 1, dtype=torch.float64) ** -exponent, generator)


class GradientStream:
    """Gradients as in training: a fixed power-law "signal" per matrix plus fresh noise of
    ``noise`` times its RMS each step (consecutive steps are correlated, so warm starts matter).
    Precomputes ``pool`` noise draws and cycles through them (cheap per step)."""

    def __init__(self, shapes: Sequence[Shape], seed: int = 0, noise: float = 0.5, pool: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.base = [power_law(n, m, g) for n, m in shapes]
        self.noise = [[torch.randn(n, m, generator=g) * (noise * float(b.norm()) / math.sqrt(n * m))
                       for (n, m), b in zip(shapes, self.base)] for _ in range(pool)]
        self.t = 0

    def grads(self, t: int | None = None) -> list[torch.Tensor]:
        t = self.t if t is None else t
        self.t = t + 1
        return [b + e for b, e in zip(self.base, self.noise[t % len(self.noise)])]


def make_params(shapes: Sequence[Shape], seed: int = 1) -> list[torch.nn.Parameter]:
    """Kaiming-scaled 2-D weights, one per shape."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, m, generator=g) * math.sqrt(2.0 / m)) for n, m in shapes]


def set_grads(params: Iterable[torch.nn.Parameter], grads: Iterable[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


# -- the floor ----------------------------------------------------------------------------------
def stack_by_shape(mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Same-shaped matrices stacked (``B × n × m``), in short-side (wide) orientation."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    for M in mats:
        groups[tuple(M.shape)].append(M if M.shape[0] <= M.shape[1] else M.mT)
    return [torch.stack(ms).contiguous() for ms in groups.values()]


def ns_floor(stacks: Sequence[torch.Tensor], steps: int = 5, schedule: str = "jordan") -> list[torch.Tensor]:
    """The standard float32 Newton–Schulz chain (``msign(..., method="standard")``: a Frobenius
    normalisation, then three batched GEMMs per step) over pre-stacked wide matrices. No
    momentum, no copies, no update: the floor every optimizer is measured against."""
    from lightning_spectral.optim.msign import msign

    return [msign(X, steps, schedule, dtype=torch.float32, method="standard") for X in stacks]


def ns_flops(shapes: Sequence[Shape], steps: int = 5) -> float:
    """``steps·(4 m²n + 2 m³)`` per ``m × n`` matrix (``m`` the short side)."""
    total = 0.0
    for n, m in shapes:
        s, l = min(n, m), max(n, m)
        total += 4 * s * s * l + 2 * s**3
    return steps * total


# -- timing ---------------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def interleaved(cases: dict[str, Callable[[], object]], warmup: int, repeats: int,
                cap_s: float = math.inf, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run every case ``warmup`` times, then ``repeats`` rounds A B C … A B C …, and return each
    case's times and median. A case whose last warm-up call took longer than ``cap_s`` is not
    repeated: its median is that last (warm-started) warm-up call, and ``capped=True``."""
    results: dict[str, dict] = {name: {"warmup_s": [], "times_s": [], "capped": False} for name in cases}
    for name, fn in cases.items():
        for _ in range(warmup):
            results[name]["warmup_s"].append(timed(fn))
        results[name]["capped"] = bool(results[name]["warmup_s"]) and results[name]["warmup_s"][-1] > cap_s
        if log:
            log(f"  warm {name}: {', '.join(f'{t:.3f}' for t in results[name]['warmup_s'])} s")
    for _ in range(repeats):
        for name, fn in cases.items():
            if not results[name]["capped"]:
                results[name]["times_s"].append(timed(fn))
    for r in results.values():
        r["median_s"] = median(r["times_s"] or r["warmup_s"][-1:])
    return results


# -- formatting -----------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_result(path: Path, result: dict, markdown: Optional[str] = None,
                 default: Callable[[Any], Any] = str) -> None:
    """``result`` as JSON at ``path`` (parents created) and, with ``markdown``, the tables beside it
    (``path`` with the suffix ``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=default))
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown + "\n")


def _gloo_rank(rank: int, port: int, world: int, worker: Callable, args: Any, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, args, queue)
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(worker: Callable, args: Any, results: int, timeout: float, world: int = 2) -> list:
    """Run ``worker(rank, args, queue)`` (a module-level function) in ``world`` spawned processes, each
    with one thread and a gloo process group on a free local port; returns the first ``results``
    items the workers put on ``queue``."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(rank, port, world, worker, args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    items = [queue.get(timeout=timeout) for _ in range(results)]
    for p in procs:
        p.join()
    return items
