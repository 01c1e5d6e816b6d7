"""Lightning callbacks over :mod:`lightning_spectral.diagnostics`; they observe and never change training.

Usable in any LightningModule. Loss-based callbacks (sharpness, GNS on one device) get their
loss from, in order: a ``loss_fn(model, x, y)`` argument, the module's
``loss_for_batch(batch)`` method, ``criterion(module(x), y)`` on ``(x, y)`` batches, or (automatic
optimization) the tensor or ``{"loss": ...}`` its ``training_step`` returns. Their values are in
``trainer.callback_metrics``, so ``EarlyStopping(monitor="sharpness/lambda_max")`` works.
"""

from lightning_spectral.callbacks._base import DiagnosticCallback
from lightning_spectral.callbacks.constraint import ConstraintMonitor
from lightning_spectral.callbacks.epoch_recorder import EpochRecorder
from lightning_spectral.callbacks.hparams import HParamsSummary
from lightning_spectral.callbacks.noise_scale import GradientNoiseScaleMonitor
from lightning_spectral.callbacks.predictions import PredictionWriter
from lightning_spectral.callbacks.sharpness import SharpnessMonitor
from lightning_spectral.callbacks.spectral import SpectralNormMonitor
from lightning_spectral.callbacks.update_size import UpdateSizeMonitor

__all__ = [
    "ConstraintMonitor",
    "DiagnosticCallback",
    "EpochRecorder",
    "GradientNoiseScaleMonitor",
    "HParamsSummary",
    "PredictionWriter",
    "SharpnessMonitor",
    "SpectralNormMonitor",
    "UpdateSizeMonitor",
]
