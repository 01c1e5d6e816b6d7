from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import CIFAR10

from lightning_spectral.data import (
    CIFAR10DataModule,
    DataDescription,
    DataShapeError,
    DatasetUnavailableError,
    DigitsDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
    data_arguments,
)
from lightning_spectral.models import GPT, MLP, SmallCNN


def prepared(dm: TorchvisionDataModule | DigitsDataModule):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_digits_split_is_seeded_disjoint_and_standardised() -> None:
    dm = prepared(DigitsDataModule(val_fraction=0.2, split_seed=0))
    x_train, y_train = dm.train_set.tensors
    x_val, y_val = dm.eval_set.tensors
    assert (len(x_train), len(x_val)) == (1438, 359)  # 1797 images, round(0.2 * 1797) held out
    assert x_train.shape[1:] == (dm.in_channels, dm.image_size, dm.image_size) == (1, 8, 8)
    assert set(y_train.tolist()) == set(range(dm.num_classes))
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-5
    train_rows = {tuple(r) for r in x_train.flatten(1).tolist()}
    assert not any(tuple(r) in train_rows for r in x_val.flatten(1).tolist()[:50])
    again = prepared(DigitsDataModule(split_seed=0)).eval_set.tensors[1]
    other = prepared(DigitsDataModule(split_seed=1)).eval_set.tensors[1]
    assert torch.equal(again, y_val) and not torch.equal(other, y_val)


def test_digits_loaders_shuffle_train_only() -> None:
    dm = prepared(DigitsDataModule(batch_size=100))
    assert len(dm.train_dataloader()) == 1438 // 100  # drop_last for training
    assert torch.equal(next(iter(dm.val_dataloader()))[1], dm.eval_set.tensors[1][:100])
    assert torch.equal(next(iter(dm.test_dataloader()))[1], dm.eval_set.tensors[1][:100])


def test_mnist_reads_the_idx_files(fake_mnist) -> None:
    dm = prepared(MNISTDataModule(data_dir=str(fake_mnist.root), batch_size=16, num_workers=0))
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    x, y = next(iter(dm.val_dataloader()))
    expected = (torch.from_numpy(fake_mnist.test_images).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, torch.from_numpy(fake_mnist.test_labels))
    assert len(dm.train_set) == 32


def test_cifar10_reads_the_md5_checked_batches(fake_cifar10) -> None:
    dm = prepared(CIFAR10DataModule(data_dir=str(fake_cifar10.root), batch_size=12, num_workers=0))
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    x, y = next(iter(dm.val_dataloader()))
    mean = torch.tensor(CIFAR10DataModule.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10DataModule.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(fake_cifar10.test_images).float() / 255 - mean) / std)
    assert torch.equal(y, torch.from_numpy(fake_cifar10.test_labels))
    assert np.array_equal(dm.train_set.targets, fake_cifar10.train_labels)
    # Training images are augmented: a crop of the 4-pixel-padded image, maybe flipped.
    torch.manual_seed(0)
    augmented = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert augmented.shape == (8, 3, 32, 32) and not all(torch.equal(a, augmented[0]) for a in augmented)


def test_cifar10_without_augmentation_trains_on_the_plain_images(fake_cifar10) -> None:
    """``augment=False``: training images are exactly the normalised stored pixels."""
    dm = prepared(CIFAR10DataModule(data_dir=str(fake_cifar10.root), num_workers=0, augment=False))
    mean = torch.tensor(CIFAR10DataModule.mean).view(3, 1, 1)
    std = torch.tensor(CIFAR10DataModule.std).view(3, 1, 1)
    expected = (torch.from_numpy(fake_cifar10.train_images[0]).float() / 255 - mean) / std
    torch.testing.assert_close(dm.train_set[0][0], expected)


def test_cifar10_corrupted_file_is_reported_as_corrupt_not_missing(fake_cifar10) -> None:
    batch = fake_cifar10.root / CIFAR10.base_folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\0")
    with pytest.raises(DatasetUnavailableError, match=r"1 file\(s\) .* are there but corrupt .*data_batch_3\. Delete"):
        prepared(CIFAR10DataModule(data_dir=str(fake_cifar10.root), download=False))


def test_a_corrupt_cifar10_archive_is_named(tmp_path: Path, unreachable_downloads: None) -> None:
    (tmp_path / CIFAR10.filename).write_bytes(b"not a tar archive")
    for download in (False, True):
        with pytest.raises(DatasetUnavailableError, match=r"corrupt \(MD5 checksum mismatch\): .*cifar-10-python\.tar\.gz"):
            CIFAR10DataModule(data_dir=str(tmp_path), download=download).prepare_data()


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (CIFAR10DataModule, ["CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1"]),
        (MNISTDataModule, ["MNIST", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ],
)
def test_offline_download_fails_at_once_with_instructions(
    cls: type[TorchvisionDataModule], expected: list[str], tmp_path: Path, unreachable_downloads: None
) -> None:
    root = tmp_path / "nowhere"
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        cls(data_dir=str(root)).prepare_data()
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for text in [str(root), "could not be downloaded", *expected]:
        assert text in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no urllib traceback chained


def test_missing_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match="download=False"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DigitsDataModule(val_fraction=1.0), "val_fraction"),
        (lambda: DigitsDataModule(batch_size=0), "batch_size"),
        (lambda: MNISTDataModule(num_workers=-1), "num_workers"),
        (lambda: CIFAR10DataModule(download_timeout=0), "download_timeout"),
    ],
)
def test_bad_arguments_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_loaders_need_setup() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# -- the data contract: what a data module tells the network ------------------------------------
class Plain(LightningDataModule):
    """A plain data module declaring nothing: ``x`` of shape ``shape``, labels 0..classes-1."""

    def __init__(self, shape=(40,), classes: int = 3, labelled: bool = True, **declared) -> None:
        super().__init__()
        self.shape, self.classes, self.labelled, self.setups = shape, classes, labelled, 0
        for name, value in declared.items():
            setattr(self, name, value)

    def setup(self, stage: str) -> None:
        self.setups += 1
        x = torch.randn(12, *self.shape)
        y = torch.arange(12) % self.classes
        self.train_set = TensorDataset(x, y) if self.labelled else TensorDataset(x)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=4)


def test_declared_attributes_size_the_network_without_setup() -> None:
    dm = DigitsDataModule()
    assert dm.input_shape == (1, 8, 8)
    assert data_arguments(MLP, dm) == {"num_classes": 10, "input_shape": (1, 8, 8), "in_channels": 1,
                                       "image_size": 8, "in_features": 64}
    assert data_arguments(SmallCNN, dm) == {"num_classes": 10, "in_channels": 1, "image_size": 8}
    assert dm.train_set is None  # read from the attributes, nothing loaded
    assert data_arguments(Plain, Plain(num_classes=5, input_shape=[7])) == {}  # a class without such arguments


def test_undeclared_shape_and_classes_come_from_the_data() -> None:
    dm = Plain(shape=(40,), classes=3)
    assert data_arguments(MLP, dm) == {"num_classes": 3, "input_shape": (40,), "in_features": 40}
    images = Plain(shape=(2, 6, 6), classes=4)
    assert data_arguments(SmallCNN, images) == {"num_classes": 4, "in_channels": 2, "image_size": 6}
    description = DataDescription(Plain(shape=(2, 6, 6), classes=4))
    assert (description["input_shape"], description["in_features"], description["num_classes"]) == ((2, 6, 6), 72, 4)
    assert description.datamodule.setups == 1  # one setup serves every inferred value


def test_what_the_data_cannot_give_is_an_error_or_left_out() -> None:
    with pytest.raises(DataShapeError, match="not square images"):
        data_arguments(SmallCNN, Plain(shape=(40,)))
    with pytest.raises(DataShapeError, match="declare num_classes"):
        data_arguments(MLP, Plain(labelled=False))  # MLP's default of 10 classes would be silently wrong
    assert data_arguments(MLP, Plain(labelled=False, num_classes=3))["num_classes"] == 3
    # vocab_size/block_size are never inferred; an optional argument (default None) is left out.
    assert data_arguments(GPT, Plain(labelled=False)) == {}
    text = Plain(labelled=False, vocab_size=256, block_size=16)
    assert data_arguments(GPT, text) == {"vocab_size": 256, "block_size": 16}
