"""Pure-PyTorch training diagnostics (no Lightning import): spectral norms, sharpness, gradient noise scale.

Loss convention: ``loss_fn(model, x, y) -> scalar mean loss`` over the batch.
"""

from lightning_spectral.diagnostics._utils import isolated
from lightning_spectral.diagnostics.lr_scan import lr_stability_scan
from lightning_spectral.diagnostics.metrics_logger import MetricsLogger
from lightning_spectral.diagnostics.noise_scale import (
    GradientNoiseScale,
    ShardedGradientNorms,
    estimate_gradient_noise_scale,
    grad_sq_norms,
    noise_components,
)
from lightning_spectral.diagnostics.sharpness import (
    FiniteDifferenceHVP,
    HessianVectorProduct,
    ShardedHessianVectorProduct,
    estimate_sam_sharpness,
    estimate_sharpness,
    hessian_top_eigenvalue,
    hessian_vector_products,
)
from lightning_spectral.diagnostics.spectral import (
    SpectralNormTracker,
    compute_singular_values,
    compute_spectral_norms,
    conv_operator_norm,
    power_iteration,
    spectral_layers,
    stable_rank,
    weight_matrix,
)
from lightning_spectral.diagnostics.update_size import UpdateSizeTracker, promised_update_norm

__all__ = [
    "FiniteDifferenceHVP",
    "GradientNoiseScale",
    "HessianVectorProduct",
    "MetricsLogger",
    "ShardedGradientNorms",
    "ShardedHessianVectorProduct",
    "SpectralNormTracker",
    "UpdateSizeTracker",
    "compute_singular_values",
    "compute_spectral_norms",
    "conv_operator_norm",
    "estimate_gradient_noise_scale",
    "estimate_sam_sharpness",
    "lr_stability_scan",
    "estimate_sharpness",
    "grad_sq_norms",
    "hessian_top_eigenvalue",
    "hessian_vector_products",
    "isolated",
    "noise_components",
    "power_iteration",
    "promised_update_norm",
    "spectral_layers",
    "stable_rank",
    "weight_matrix",
]
