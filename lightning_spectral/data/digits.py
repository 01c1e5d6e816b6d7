"""scikit-learn's bundled handwritten digits: offline, 8×8 grayscale, 10 classes, 1797 images."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from lightning_spectral.data.base import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """The digits, split once into train and validation sets by a seeded permutation.

    Pixels (0..16) are standardised with the training split's mean and standard deviation.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the 1797 images held out for validation.
        split_seed: seed of the split; independent of ``seed_everything``.
        num_workers: data-loading worker processes (0 is fastest for this tiny set).
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def make_datasets(self) -> tuple[Dataset, Dataset]:
        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.as_tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = round(self.val_fraction * len(x))
        val_idx, train_idx = order[:n_val], order[n_val:]
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
        return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])
