"""Lightning data modules: the bundled digits (offline default), CIFAR-10 and MNIST."""

from lightning_spectral.data.base import ImageDataModule
from lightning_spectral.data.digits import DigitsDataModule
from lightning_spectral.data.vision import (
    CIFAR10DataModule,
    DatasetUnavailableError,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
]
