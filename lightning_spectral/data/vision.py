"""CIFAR-10 and MNIST through torchvision, with a clear error when the files cannot be had."""

from __future__ import annotations

import socket
from abc import abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torchvision.transforms as T
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, MNIST, VisionDataset
from torchvision.datasets.utils import check_integrity

from lightning_spectral.data.base import ImageDataModule


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on disk and could not be downloaded."""


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset whose train split trains and whose test split is held out.

    ``prepare_data`` downloads the files when they are missing (``download=True``); if that
    fails (offline, blocked) or the files are missing with ``download=False``, it raises
    :class:`DatasetUnavailableError` naming the directory and the files to put there.

    Args:
        data_dir: where the files are (or go); relative paths are relative to the working directory.
        batch_size: samples per batch (per device under DDP).
        num_workers: data-loading worker processes.
        download: fetch missing files from the internet.
        download_timeout: seconds a network operation may stall before the download is given up.
    """

    dataset_cls: ClassVar[type[VisionDataset]]
    display_name: ClassVar[str]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        download: bool = True,
        download_timeout: float = 30.0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if download_timeout <= 0:
            raise ValueError(f"download_timeout must be > 0, got {download_timeout}")
        self.data_dir = data_dir
        self.download = download
        self.download_timeout = download_timeout

    @abstractmethod
    def placement_hint(self, root: Path) -> str:
        """Where the files go under ``root`` and where to get them."""

    def checked_files(self, root: Path) -> list[tuple[Path, str]]:
        """``(path, md5)`` of the files torchvision checks, so that a damaged file is told from a
        missing one."""
        return []

    def train_transform(self) -> T.Compose:
        """Transform of the training images; no augmentation unless a subclass adds it."""
        return self.eval_transform()

    def eval_transform(self) -> T.Compose:
        """Tensor conversion and per-channel normalisation."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def prepare_data(self) -> None:
        for train in (True, False):
            self._open(train, download=self.download)

    def make_datasets(self) -> tuple[Dataset, Dataset]:
        return (
            self._open(True, download=False, transform=self.train_transform()),
            self._open(False, download=False, transform=self.eval_transform()),
        )

    def _open(self, train: bool, download: bool, transform: T.Compose | None = None) -> VisionDataset:
        root = Path(self.data_dir).expanduser().resolve()
        try:
            with _socket_timeout(self.download_timeout):
                return self.dataset_cls(str(root), train=train, download=download, transform=transform)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
            damaged = [str(path) for path, md5 in self.checked_files(root) if path.is_file() and not check_integrity(
                str(path), md5)]
            if damaged:
                raise DatasetUnavailableError(
                    f"{self.display_name}: {len(damaged)} file(s) in '{root}' are there but corrupt (MD5 checksum "
                    f"mismatch): {', '.join(damaged)}. Delete them and download again. {self.placement_hint(root)}"
                ) from None
            how = "could not be downloaded" if download else "download=False"
            reason = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
            raise DatasetUnavailableError(
                f"{self.display_name} is missing or incomplete in '{root}' ({how}; {reason}). "
                f"{self.placement_hint(root)}"
            ) from None


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 with the usual augmentation (random crop with 4-pixel padding, horizontal flip;
    He et al. 2016, "Deep residual learning", §4.2) and per-channel normalisation; the 10,000
    test images are held out."""

    dataset_cls = CIFAR10
    display_name = "CIFAR-10"
    num_classes = 10
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, *args: Any, augment: bool = True, **kwargs: Any) -> None:
        """``augment=False`` trains on the plain normalised images."""
        super().__init__(*args, **kwargs)
        self.augment = augment

    def train_transform(self) -> T.Compose:
        if not self.augment:
            return self.eval_transform()
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), self.eval_transform()])

    def checked_files(self, root: Path) -> list[tuple[Path, str]]:
        folder = root / CIFAR10.base_folder
        batches = [(folder / name, md5) for name, md5 in (*CIFAR10.train_list, *CIFAR10.test_list)]
        return [(root / CIFAR10.filename, CIFAR10.tgz_md5), *batches, (folder / CIFAR10.meta["filename"],
                                                                     CIFAR10.meta["md5"])]

    def placement_hint(self, root: Path) -> str:
        return (
            f"Download {CIFAR10.url} on a connected machine and either copy the archive into "
            f"'{root}' (it is checked and unpacked on the next run) or unpack it there, so that "
            f"'{root / CIFAR10.base_folder}' holds data_batch_1 ... data_batch_5, test_batch and batches.meta."
        )


class MNISTDataModule(TorchvisionDataModule):
    """MNIST, normalised with its usual mean and standard deviation; the 10,000 test images are held out."""

    dataset_cls = MNIST
    display_name = "MNIST"
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean = (0.1307,)
    std = (0.3081,)

    def checked_files(self, root: Path) -> list[tuple[Path, str]]:
        return [(root / "MNIST" / "raw" / name, md5) for name, md5 in MNIST.resources]

    def placement_hint(self, root: Path) -> str:
        files = ", ".join(name for name, _ in MNIST.resources)
        return (
            f"Download {files} (from {MNIST.mirrors[0]}) on a connected machine and copy them into "
            f"'{root / 'MNIST' / 'raw'}' (gzipped files are checked and unpacked on the next run "
            "with download=True; unpacked files work either way)."
        )
