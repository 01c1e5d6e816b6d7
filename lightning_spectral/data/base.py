"""The data-module contract the CLI relies on."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochSeededSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch`
    before every epoch, so a run resumed from an epoch-end checkpoint sees the same batches as
    the uninterrupted run (a plain ``shuffle=True`` draws from the global RNG, whose state a
    checkpoint does not hold). Under DDP Lightning replaces any ``RandomSampler`` with its
    ``DistributedSampler``, which is epoch-seeded the same way."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed((self.seed + epoch) % (1 << 64))


class ImageDataModule(LightningDataModule, ABC):
    """Image classification data: a training set and a held-out set.

    Subclasses set the class attributes ``num_classes``, ``in_channels`` and ``image_size``
    (the CLI links them into the model) and implement :meth:`make_datasets`. The held-out
    set serves ``validate``, ``test`` and ``predict`` alike.

    Args:
        batch_size: samples per batch (per device under DDP).
        num_workers: data-loading worker processes.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.eval_set: Dataset | None = None

    @abstractmethod
    def make_datasets(self) -> tuple[Dataset, Dataset]:
        """Return ``(train, held_out)``; called once, in ``setup``, on every process."""

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set, self.eval_set = self.make_datasets()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # seed: torch's initial seed, which ``seed_everything`` sets
            sampler=EpochSeededSampler(dataset, torch.initial_seed()) if shuffle else None,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
