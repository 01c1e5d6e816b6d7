"""Lightning data modules: the bundled digits (offline default), CIFAR-10, MNIST and byte-level text; the contract
by which any data module sizes the network (:func:`data_arguments`, :data:`DATA_ATTRIBUTES`)."""

from lightning_spectral.data.base import (
    DATA_ATTRIBUTES,
    DataDescription,
    DataShapeError,
    ImageDataModule,
    data_arguments,
)
from lightning_spectral.data.digits import DigitsDataModule
from lightning_spectral.data.text import ByteTextDataModule, PythonSourceDataModule, TinyShakespeareDataModule
from lightning_spectral.data.vision import (
    CIFAR10DataModule,
    DatasetUnavailableError,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "ByteTextDataModule",
    "CIFAR10DataModule",
    "DATA_ATTRIBUTES",
    "DataDescription",
    "DataShapeError",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "PythonSourceDataModule",
    "TinyShakespeareDataModule",
    "TorchvisionDataModule",
    "data_arguments",
]
