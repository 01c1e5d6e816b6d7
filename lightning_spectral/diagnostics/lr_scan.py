"""``lr_stability_scan``: the largest learning rate at which a fresh model still trains (pure PyTorch).

Log-spaced learning rates, a fresh model and optimizer for each, a fixed number of steps; the
stable envelope is the run of converged learning rates that starts at the smallest. When even
the smallest learning rate diverges, ``max_stable_lr`` is NaN rather than a learning rate that
never trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_stability_scan: the loader yields no batches")


def _to(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return x.to(device), y.to(device)


def lr_stability_scan(
    model_factory: Callable[[], nn.Module],
    optimizer_factory: Callable[[nn.Module, float], torch.optim.Optimizer],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable[Any],
    lr_range: tuple[float, float] = (1e-4, 1.0),
    num_lrs: int = 10,
    steps_per_lr: int = 50,
    device: torch.device | str | None = None,
    divergence_threshold: float = 1e6,
    lr_values: Sequence[float] | None = None,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Train a fresh model for ``steps_per_lr`` steps at each of ``num_lrs`` log-spaced learning rates.

    Args:
        model_factory: ``() -> nn.Module``, a fresh model per learning rate.
        optimizer_factory: ``(model, lr) -> Optimizer``.
        loss_fn: ``(model, x, y) -> scalar loss``.
        loader: yields ``(x, y, ...)`` batches; cycled when shorter than ``steps_per_lr``.
        lr_range: ``(smallest, largest)`` learning rate, both > 0; the grid is ``np.logspace``.
        num_lrs: number of learning rates.
        steps_per_lr: optimizer steps per learning rate.
        device: where to train (default: CPU).
        divergence_threshold: a run has diverged once a loss is above it or not finite (or the
            optimizer refuses a non-finite gradient); the run stops there.
        lr_values: explicit learning rates instead of ``lr_range``/``num_lrs`` (sorted ascending).
        seed: ``torch.manual_seed(seed)`` before each model is built (the same initialisation
            and batch order for every lr; the global RNG state is restored afterwards); ``None``
            leaves the RNG alone.

    Returns:
        ``{"lr_values", "converged", "final_losses", "max_stable_lr"}``: ``final_losses[i]`` is
        the last training loss (measured before the last step; ``inf`` if diverged);
        ``max_stable_lr`` is the largest lr of the run of converged lrs starting at the smallest
        one, and NaN if the smallest lr already diverges.
    """
    if lr_values is None:
        low, high = lr_range
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"lr_range must be (low, high) with 0 < low <= high, got {lr_range!r}")
        if num_lrs < 1:
            raise ValueError(f"num_lrs must be >= 1, got {num_lrs}")
        lrs = [float(v) for v in np.logspace(math.log10(low), math.log10(high), num_lrs)]
    else:
        lrs = sorted(float(v) for v in lr_values)
        if not lrs or lrs[0] <= 0:
            raise ValueError(f"lr_values must be positive and non-empty, got {lr_values!r}")
    if steps_per_lr < 1:
        raise ValueError(f"steps_per_lr must be >= 1, got {steps_per_lr}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    divergence_threshold = float(divergence_threshold)

    converged: list[bool] = []
    final_losses: list[float] = []
    for lr in lrs:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = model_factory().to(device)
            model.train()
            optimizer = optimizer_factory(model, lr)
            batches = _cycle(loader)
            diverged, last = False, math.nan
            for _ in range(steps_per_lr):
                x, y = _to(next(batches), device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, x, y)
                last = float(loss.detach())
                if not math.isfinite(last) or last > divergence_threshold:
                    diverged = True
                    break
                loss.backward()
                try:
                    optimizer.step()
                except FloatingPointError:  # NonFiniteGradientError of the package's optimizers
                    diverged = True
                    break
        converged.append(not diverged)
        final_losses.append(math.inf if diverged else last)

    max_stable = math.nan
    for lr, ok in zip(lrs, converged):
        if not ok:
            break
        max_stable = lr
    return {"lr_values": lrs, "converged": converged, "final_losses": final_losses, "max_stable_lr": max_stable}
