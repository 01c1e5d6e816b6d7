"""``SpectralNormMonitor``: per-layer top singular values, stable ranks and singular-value histograms."""

from __future__ import annotations

import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_spectral.callbacks._base import (
    DiagnosticCallback,
    check_choice,
    check_positive_int,
    has_sharded_parameters,
    histogram_writers,
    unsharded_weights,
)
from lightning_spectral.diagnostics.spectral import (
    SpectralNormTracker,
    check_blocks,
    compute_singular_values,
    compute_spectral_norms,
    spectral_layers,
    stable_rank,
    weight_matrix,
)


class SpectralNormMonitor(DiagnosticCallback):
    r"""Log :math:`\sigma_{\max}` and stable rank :math:`\|W\|_F^2/\sigma_{\max}^2` of every Linear and conv layer.

    Keys: ``spectral_norm/<layer>``, ``spectral_norm/max``, ``stable_rank/<layer>``; with a
    TensorBoard logger also histograms ``singular_values/<layer>`` (full ``svdvals``). Conv
    kernels are reshaped to ``(out, in*k*k)``: this is the kernel norm the Muon optimizers
    constrain, not the convolution's operator norm. With DTensor-sharded parameters (FSDP2,
    ``ModelParallelStrategy``) every rank gathers each full weight and measures it.

    Args:
        every_n_steps: measure every N optimizer steps (default 50), or
        every_n_epochs: measure at the end of every N-th training epoch.
        method: ``"power"`` (warm-started power iteration with persistent vectors, stopped at
            ``tol``; the vectors are checkpointed) or ``"svd"`` (exact ``matrix_norm(ord=2)``).
        max_iter, tol: power-iteration limits per measurement.
        log_stable_rank: also log stable ranks.
        log_histograms: log singular-value spectra to loggers that have ``add_histogram``.
        max_layers: only the first N layers (default all).
        seed: seed of the power iteration's first vectors (the global RNG is not used).
        blocks: per-head norms too: ``{layer-name glob: rows per block}`` (e.g.
            ``{"*.q_proj": 32, "*.k_proj": 32, "*.v_proj": 32}``) or ``"auto"`` (every
            ``models.gpt`` attention: Q/K/V by rows, O by columns, blocks of ``head_dim``). Each
            split layer also logs ``spectral_norm/<layer>/head<h>`` (one batched computation per
            layer); ``spectral_norm/max`` stays the maximum over whole layers.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        method: Literal["power", "svd"] = "power",
        max_iter: int = 20,
        tol: float = 1e-4,
        log_stable_rank: bool = True,
        log_histograms: bool = True,
        max_layers: int | None = None,
        seed: int = 0,
        blocks: dict[str, int] | Literal["auto"] | None = None,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        check_choice("method", method, ("power", "svd"))
        check_positive_int("max_iter", max_iter)
        check_positive_int("max_layers", max_layers, allow_none=True)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        check_blocks(blocks)
        self.blocks = blocks
        self.method = method
        self.log_stable_rank = log_stable_rank
        self.log_histograms = log_histograms
        self.max_layers = max_layers
        self.tracker = SpectralNormTracker(max_iter=max_iter, tol=tol, seed=seed, max_layers=max_layers,
                                           blocks=blocks)

    def charts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[str]]:
        """The layers' spectral norms on one chart (and their stable ranks on another)."""
        names = [re.escape(name) + "$" for name, _ in spectral_layers(pl_module, max_layers=self.max_layers)]
        out = {"spectral norm per layer": [f"spectral_norm/{name}" for name in names]}
        if self.log_stable_rank:
            out["stable rank per layer"] = [f"stable_rank/{name}" for name in names]
        return out

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        if has_sharded_parameters(pl_module):  # every rank gathers the full matrices and measures them
            with unsharded_weights(pl_module):
                return self._measure(trainer, pl_module, step)
        if not trainer.is_global_zero:  # weights are identical on all ranks and loggers write on rank 0
            return {}
        return self._measure(trainer, pl_module, step)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        if self.method == "power":
            norms = self.tracker(pl_module)
        else:
            norms = compute_spectral_norms(pl_module, max_layers=self.max_layers, blocks=self.blocks)
        metrics = {f"spectral_norm/{name}": sigma for name, sigma in norms.items()}
        layers = spectral_layers(pl_module, max_layers=self.max_layers)
        if layers:
            metrics["spectral_norm/max"] = max(norms[name] for name, _ in layers)
        if self.log_stable_rank:
            for name, module in layers:
                metrics[f"stable_rank/{name}"] = stable_rank(weight_matrix(module), norms[name])
        writers = histogram_writers(trainer) if self.log_histograms else []
        if writers:
            for name, values in compute_singular_values(pl_module, max_layers=self.max_layers).items():
                for add_histogram in writers:
                    add_histogram(f"singular_values/{name}", values, global_step=step)
        return metrics
